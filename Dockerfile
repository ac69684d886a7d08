# One image per binary of the workspace, from one Dockerfile:
#
#   docker buildx build --build-arg BIN=kubesaga-order --platform linux/amd64,linux/arm64 -t ... .
#
# BIN is one of kubesaga-operator (default), kubesaga-order, kubesaga-inventory, kubesaga-payment,
# kubesaga-notification. The builder stage does not depend on BIN: it compiles all five once per target
# architecture, so building the five images in a row (or from a shared build cache) compiles the workspace once
# per architecture. It runs on the build machine's own architecture and cross-compiles for the other one
# (no emulation). The runtime image is distroless with glibc and CA certificates, runs as uid 65532, and holds
# the binary alone: SQL migrations and the order service's saga template are compiled into the binaries.

ARG RUST_VERSION=1.95.0
ARG BIN=kubesaga-operator

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-slim-bookworm AS builder
ARG TARGETARCH
ARG BUILDARCH
# The linkers and C compilers (aws-lc-sys, ring) per target. On the build machine's own architecture these names
# are the native gcc and binutils; for the other one they come from Debian's cross packages installed below.
ENV CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_x86_64_unknown_linux_gnu=x86_64-linux-gnu-ar \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_INCREMENTAL=0 \
    CARGO_NET_RETRY=10 \
    CARGO_TERM_COLOR=never
RUN set -eux; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu; cross="gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;; \
      arm64) triple=aarch64-unknown-linux-gnu; cross="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;; \
      *) echo "unsupported TARGETARCH '$TARGETARCH' (amd64, arm64)" >&2; exit 1 ;; \
    esac; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends $cross; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$triple"; \
    echo "$triple" >/rust-target
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=kubesaga-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=kubesaga-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=kubesaga-target-$TARGETARCH,target=/src/target,sharing=locked \
    set -eux; \
    triple=$(cat /rust-target); \
    cargo build --locked --release --target "$triple" -p kubesaga-operator -p kubesaga-order \
      -p kubesaga-inventory -p kubesaga-payment -p kubesaga-notification; \
    mkdir -p /out; \
    for b in kubesaga-operator kubesaga-order kubesaga-inventory kubesaga-payment kubesaga-notification; do \
      cp "target/$triple/release/$b" /out/; \
    done

# distroless/cc: glibc, libgcc, CA certificates, tzdata and nothing else; `nonroot` is uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
# The services bind 127.0.0.1 by default (right for a laptop); in a container they must listen on all interfaces.
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080

FROM runtime AS kubesaga-operator
COPY --from=builder /out/kubesaga-operator /usr/local/bin/kubesaga-operator
ENTRYPOINT ["/usr/local/bin/kubesaga-operator"]
CMD ["run"]

FROM runtime AS kubesaga-order
COPY --from=builder /out/kubesaga-order /usr/local/bin/kubesaga-order
ENTRYPOINT ["/usr/local/bin/kubesaga-order"]

FROM runtime AS kubesaga-inventory
COPY --from=builder /out/kubesaga-inventory /usr/local/bin/kubesaga-inventory
ENTRYPOINT ["/usr/local/bin/kubesaga-inventory"]

FROM runtime AS kubesaga-payment
COPY --from=builder /out/kubesaga-payment /usr/local/bin/kubesaga-payment
ENTRYPOINT ["/usr/local/bin/kubesaga-payment"]

FROM runtime AS kubesaga-notification
COPY --from=builder /out/kubesaga-notification /usr/local/bin/kubesaga-notification
ENTRYPOINT ["/usr/local/bin/kubesaga-notification"]

# The image: the stage BIN names.
FROM ${BIN}
