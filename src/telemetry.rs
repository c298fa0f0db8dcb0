//! Optional OpenTelemetry trace export over OTLP/gRPC, built only with the cargo feature
//! `otlp` (off by default, so the default build carries none of it). When built in and the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! `serve` exports its spans (one `call` span per RPC, with its request id, operation and
//! tenant) to that collector, each a child of the caller's W3C `traceparent` when one was
//! sent, so the KMS call appears inside the caller's trace. Spans carry the same fields as
//! the log lines: never a secret.

/// A caller's validated W3C `traceparent`, as the parts the exported span needs.
#[derive(Debug, Clone, Copy)]
pub struct RemoteParent<'a> {
    /// 32 lower-case hex digits.
    pub trace_id: &'a str,
    /// The caller's span: 16 lower-case hex digits.
    pub span_id: &'a str,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Makes `span` a child of the caller's trace in the exported spans; nothing without the
/// `otlp` feature.
pub fn adopt_parent(span: &tracing::Span, parent: Option<RemoteParent<'_>>) {
    #[cfg(feature = "otlp")]
    if let Some(parent) = parent {
        otlp::adopt_parent(span, parent);
    }
    #[cfg(not(feature = "otlp"))]
    let _ = (span, parent);
}

/// The layer exporting spans to the OTLP collector the environment names, when the `otlp`
/// feature is built in and an endpoint is set (`None` otherwise). Must be called inside a
/// tokio runtime, which then carries the exporter's connection.
#[cfg(feature = "otlp")]
pub fn layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    otlp::layer()
}

/// Without the `otlp` feature: no layer.
#[cfg(not(feature = "otlp"))]
pub fn layer<S>() -> Option<tracing_subscriber::layer::Identity>
where
    S: tracing::Subscriber,
{
    None
}

/// Flushes the spans not yet exported and stops the exporter (at `serve`'s end).
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::sync::OnceLock;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    };
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::RemoteParent;

    /// The provider, kept to flush it at shutdown.
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// Whether the environment names a collector (the variables the OTLP exporter reads).
    fn configured() -> bool {
        [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
    }

    pub fn layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        if !configured() {
            return None;
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => exporter,
            Err(e) => {
                // Logging is not up yet: the one line goes straight to stderr.
                let _ = std::io::Write::write_fmt(
                    &mut std::io::stderr(),
                    format_args!("tenant-kms: OTLP exporter not started: {e}\n"),
                );
                return None;
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("tenant-kms")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tenant-kms");
        let _ = PROVIDER.set(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    pub fn adopt_parent(span: &tracing::Span, trace: RemoteParent<'_>) {
        let (Ok(trace_id), Ok(span_id)) = (
            TraceId::from_hex(trace.trace_id),
            SpanId::from_hex(trace.span_id),
        ) else {
            return;
        };
        let parent = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(trace.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }

    pub fn shutdown() {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.shutdown();
        }
    }
}
