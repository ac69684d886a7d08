//! Logging and tracing set-up shared by every kubesaga binary.
//!
//! - Logs are JSON lines on stderr, filtered by `RUST_LOG` (default `info`); span fields (saga, step, trace id)
//!   appear on every line logged inside a span.
//! - When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are exported over OTLP/HTTP (protobuf) to it, batched; the
//!   standard `OTEL_*` variables (service name, headers, timeouts) apply.
//! - W3C trace context (`traceparent`) is the propagation format.

use opentelemetry::{
    Context, global,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// Flushes spans not yet exported when dropped; keep it alive until the process ends.
#[must_use = "dropping the guard stops trace export"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("warning: could not flush traces: {err}");
        }
    }
}

/// Installs logging and, when configured, OTLP trace export for the process named `service`. A second call in
/// the same process (tests) leaves the first set-up in place.
pub fn init(service: &'static str) -> Guard {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = fmt::layer().json().with_current_span(true).with_span_list(false).with_writer(std::io::stderr);
    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| match otlp_provider(service) {
        Ok(provider) => Some(provider),
        Err(err) => {
            eprintln!("warning: OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter failed to start: {err}");
            None
        }
    });
    let traces = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)).boxed());
    let _ = tracing_subscriber::registry().with(filter).with(logs).with(traces).try_init();
    if let Some(provider) = &provider {
        global::set_tracer_provider(provider.clone());
    }
    Guard { provider }
}

fn otlp_provider(service: &'static str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// Makes `span` part of the trace `trace_id` (32 hex digits), as a child of a remote parent. The saga controller
/// keeps each saga's trace id in its status, so every reconcile of a saga, before and after operator restarts,
/// lands in one trace. An invalid id leaves the span as it is.
pub fn join_trace(span: &tracing::Span, trace_id: &str) {
    let Ok(trace_id) = TraceId::from_hex(trace_id) else { return };
    if trace_id == TraceId::INVALID {
        return;
    }
    // The remote parent span id only has to be valid and stable for the trace; derive it from the trace id.
    let parent_id = SpanId::from_bytes(trace_id.to_bytes()[..8].try_into().unwrap_or([1; 8]));
    let parent = SpanContext::new(trace_id, parent_id, TraceFlags::SAMPLED, true, TraceState::default());
    let _ = span.set_parent(Context::new().with_remote_span_context(parent));
}

/// Makes `span` a child of the W3C trace context in `headers` (an incoming request's `traceparent`), if any.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The W3C `traceparent` of `span` when it is being traced (`OTEL_EXPORTER_OTLP_ENDPOINT` set), so the callee's
/// spans become its children.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let sc = span_ref.span_context();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}
