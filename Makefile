# Entry points. Every target is a thin wrapper around a script in hack/ or a cargo command.
SHELL := /usr/bin/env bash
.DEFAULT_GOAL := help

.PHONY: help demo demo-down test bench crds cluster-up cluster-down lint fmt tools

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

demo: ## Run the checkout demo: control plane, Redis, Postgres, services, operator, two checkouts
	hack/demo.sh

demo-down: ## Stop everything the demo started
	hack/demo.sh down

test: ## Run every test against a real local control plane, Redis and Postgres (set up and torn down as needed)
	hack/test.sh

bench: ## Benchmarks: the Saga controller, the services' write path, the outbox relay (release build; see BENCHMARKS.md)
	hack/bench.sh

crds: ## Regenerate crds/*.yaml from the Rust types, and the chart's copies of them and of the k6 scripts
	cargo run --quiet --locked -p kubesaga-operator -- crd --out-dir crds
	hack/check-chart.sh sync

cluster-up: ## Start the local control plane and install the CRDs; prints the KUBECONFIG export line
	@eval "$$(hack/cluster.sh up)" && "$$KUBECTL" apply --server-side -f crds/ >&2 && hack/cluster.sh env

cluster-down: ## Stop the local control plane, Redis and Postgres started by this checkout
	hack/env.sh down

lint: ## rustfmt, clippy, actionlint (shellcheck on run: blocks when installed) and the chart checks, as CI runs them
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	@command -v shellcheck >/dev/null || echo "lint: shellcheck is not installed, so actionlint skips the run: scripts (apt-get install shellcheck)" >&2
	bin=$$(hack/build-tools.sh actionlint) && "$$bin/actionlint" .github/workflows/*.yml
	hack/check-chart.sh

fmt: ## Format the code
	cargo fmt --all

tools: ## Build every pinned tool (control plane, helm, actionlint) into the cache; TOOLS="helm actionlint" for some
	hack/build-tools.sh $(or $(TOOLS),all)
