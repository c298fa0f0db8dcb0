//! The call span, and the optional OpenTelemetry trace export.
//!
//! **The call span.** Every line written inside a call names the call (`call{request_id=…
//! op=… tenant=…}`, or the JSON `span` object): that is what joins a log line to the caller's
//! `x-request-id` and the audit record. At the default `--log info` no line is written inside
//! a successful call, yet a tracing span made for every call cost about 7 k instructions on
//! the workers (the registry's slot, its fields formatted by the fmt layer when made and when
//! the tenant is recorded, an enter and an exit per poll, the close): about a fifth of what
//! the call costs them besides its audit append. So, unless something needs every call's
//! span (see [`set_call_spans_eager`]), a [`CallSpan`] only keeps the fields, a future run
//! [`InCallExt::in_call`] names its call in a thread-local while it is polled, and the log
//! layer ([`CallLines`]) makes the span the first time a line is written inside the call and
//! enters it for that line. The span is made with the same fields in the same order (the
//! tenant recorded afterwards), so the lines read exactly as when it was made up front.
//!
//! **OpenTelemetry.** Trace export over OTLP/gRPC is built only with the cargo feature
//! `otlp` (off by default, so the default build carries none of it). When built in and the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! `serve` exports its spans (one `call` span per RPC, made up front then, with its request
//! id, operation and tenant) to that collector, each a child of the caller's W3C
//! `traceparent` when one was sent, so the KMS call appears inside the caller's trace. Spans
//! carry the same fields as the log lines: never a secret.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The target of the call span: the module that made it before spans were made lazily, so
/// filter directives naming it (`tenant_kms::service::call=debug`) keep their meaning.
const CALL_TARGET: &str = "tenant_kms::service::call";

/// Whether every call's span is made up front (see [`set_call_spans_eager`]). Up front unless
/// `serve` installed a log subscriber that makes spans when a line needs one: that is the
/// behaviour of a process (tests, an embedder) whose subscriber has no [`CallLines`].
static EAGER: AtomicBool = AtomicBool::new(true);

/// Makes every call's span when the call begins (`true`), or only when a line is written
/// inside the call (`false`; the log subscriber must wrap its line layer in [`CallLines`]).
/// Up front is needed whenever something looks at spans other than the log lines: the OTLP
/// exporter (every call is a trace span, with its timing), a filter with span directives
/// (`[call{tenant=acme}]=debug` matches on the span's fields), or a level that writes a line
/// in every call anyway (`debug`, `trace`: the span would be made for each call regardless).
pub fn set_call_spans_eager(eager: bool) {
    EAGER.store(eager, Ordering::Relaxed);
}

thread_local! {
    /// The call whose future (or blocking work, see [`carry`]) this thread runs now.
    static CURRENT: Cell<Option<CallSpan>> = const { Cell::new(None) };
}

/// The tracing span of one call: its fields, and the span itself once something needs it
/// (up front in eager mode, else at the first line written inside the call). When the filter
/// writes warnings and errors only (`--log warn`), the span is made at error level for the
/// first such line, so that it too names its call; nothing at all when the filter disables
/// every call span. Cloning shares it.
#[derive(Clone)]
pub struct CallSpan(Option<Arc<CallFields>>);

/// What the span of a call is made from.
struct CallFields {
    request_id: String,
    op: &'static str,
    /// The caller's `traceparent` parts: trace id, parent span id, flags.
    trace: Option<(String, String, u8)>,
    made: Mutex<Made>,
}

/// The tenant (known once the call is admitted) and the span once made. Locked only when
/// the tenant is noted and when the span is made or looked up for a line: a call's steps
/// run one at a time, so it is never contended in practice.
#[derive(Default)]
struct Made {
    tenant: Option<String>,
    span: Option<tracing::Span>,
}

impl CallSpan {
    /// The span of a call with this request id and operation, a child of the caller's trace
    /// when it sent one; made now in eager mode (see [`set_call_spans_eager`]).
    pub fn new(request_id: &str, op: &'static str, trace: Option<RemoteParent<'_>>) -> Self {
        Self::with_mode(EAGER.load(Ordering::Relaxed), request_id, op, trace)
    }

    fn with_mode(
        eager: bool,
        request_id: &str,
        op: &'static str,
        trace: Option<RemoteParent<'_>>,
    ) -> Self {
        let info = tracing::enabled!(
            kind: tracing::metadata::Kind::SPAN,
            target: CALL_TARGET,
            tracing::Level::INFO
        );
        // At `--log warn` the info span is off, yet a warning written inside the call must
        // still name it: the fields are kept for the error-level span a line makes then.
        if !info
            && !tracing::enabled!(
                kind: tracing::metadata::Kind::SPAN,
                target: CALL_TARGET,
                tracing::Level::ERROR
            )
        {
            return Self(None);
        }
        let call = Self(Some(Arc::new(CallFields {
            request_id: request_id.to_owned(),
            op,
            trace: trace.map(|t| (t.trace_id.to_owned(), t.span_id.to_owned(), t.flags)),
            made: Mutex::new(Made::default()),
        })));
        // Up front only as the info span it always was (an exporter at `--log warn` gets no
        // span per call); the error-level one is made for a line only.
        if eager && info {
            call.span();
        }
        call
    }

    /// Notes the call's tenant, once parsed: every line from then on names it.
    pub fn record_tenant(&self, tenant: &str) {
        let Some(mut made) = self.lock() else {
            return;
        };
        match &made.span {
            Some(span) => {
                span.record("tenant", tenant);
            }
            None => made.tenant = Some(tenant.to_owned()),
        }
    }

    /// The span itself, made now if it was not yet (e.g. as the explicit parent of a line:
    /// the event macros evaluate it only when the line is enabled).
    pub fn span(&self) -> tracing::Span {
        let (Some(fields), Some(mut made)) = (&self.0, self.lock()) else {
            return tracing::Span::none();
        };
        if let Some(span) = &made.span {
            return span.clone();
        }
        let trace = fields.trace.as_ref();
        // The fields and their order are those of the span made up front before (the
        // tenant recorded after), so the formatted lines are the same text.
        macro_rules! call_span {
            ($level:expr) => {
                tracing::span!(
                    target: CALL_TARGET,
                    $level,
                    "call",
                    request_id = %fields.request_id,
                    op = fields.op,
                    tenant = tracing::field::Empty,
                    trace_id = trace.map(|t| t.0.as_str()),
                    parent_span_id = trace.map(|t| t.1.as_str()),
                )
            };
        }
        let mut span = call_span!(tracing::Level::INFO);
        if span.is_disabled() {
            // The filter writes warnings and errors only: the span at the level of the line
            // that needs it, so that the line still names its call.
            span = call_span!(tracing::Level::ERROR);
        }
        adopt_parent(
            &span,
            trace.map(|t| RemoteParent {
                trace_id: &t.0,
                span_id: &t.1,
                flags: t.2,
            }),
        );
        if let Some(tenant) = made.tenant.take() {
            span.record("tenant", tenant.as_str());
        }
        made.span = Some(span.clone());
        span
    }

    /// The span if it was made (eager mode, or a line was written).
    fn made(&self) -> Option<tracing::Span> {
        self.lock()?.span.clone()
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, Made>> {
        // A panic while the lock was held left at worst a tenant not noted: go on.
        let fields = self.0.as_ref()?;
        Some(fields.made.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The call this thread runs now, if any.
    fn current() -> Option<Self> {
        CURRENT.with(|current| {
            let call = current.take();
            let copy = call.clone();
            current.set(call);
            copy
        })
    }
}

/// Swaps the thread's current call with `slot` and back again when dropped (also when the
/// work inside panics, so a worker thread never keeps naming a call it no longer runs).
struct Current<'a>(&'a mut Option<CallSpan>);

impl<'a> Current<'a> {
    fn enter(slot: &'a mut Option<CallSpan>) -> Self {
        swap_current(slot);
        Self(slot)
    }
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        swap_current(self.0);
    }
}

fn swap_current(slot: &mut Option<CallSpan>) {
    let previous = CURRENT.replace(slot.take());
    *slot = previous;
}

pin_project_lite::pin_project! {
    /// A call's future: names its call as the thread's current one while it is polled, and
    /// enters the call's span for each poll when the span was made up front (as tracing's
    /// `Instrument` would).
    pub struct InCall<F> {
        #[pin]
        future: F,
        call: Option<CallSpan>,
        span: Option<tracing::Span>,
    }
}

impl<F: Future> Future for InCall<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.as_ref().map(tracing::Span::enter);
        let _current = Current::enter(this.call);
        this.future.poll(cx)
    }
}

/// Runs a future as part of a call (see [`InCall`]).
pub trait InCallExt: Future + Sized {
    /// This future, run as part of `call`: every line written while it is polled names the
    /// call.
    fn in_call(self, call: CallSpan) -> InCall<Self> {
        let span = call.made();
        InCall {
            future: self,
            // A call whose span is disabled has nothing for a line to name.
            call: call.0.is_some().then_some(call),
            span,
        }
    }
}

impl<F: Future> InCallExt for F {}

/// Wraps blocking work sent to another thread so that it runs as part of the caller's call
/// (and inside the caller's current span, when spans are made up front): its lines name the
/// call as the caller's would.
pub fn carry<T>(work: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let span = if EAGER.load(Ordering::Relaxed) {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    };
    let mut call = CallSpan::current();
    move || {
        let _current = Current::enter(&mut call);
        span.in_scope(work)
    }
}

/// The log line layer, wrapped so that a line written inside a call whose span was not made
/// yet gets it: the span is made (see [`CallSpan::span`]) and entered for the line, so the
/// wrapped layer formats the line inside it. Everything else is passed through unchanged.
///
/// The span is made through the default dispatcher while the line is being dispatched. That
/// works for a global subscriber (`serve`'s); tracing gives such a nested call no subscriber
/// when the default is a scoped one (`tracing::subscriber::with_default`), and the line would
/// then be written without the call: hence spans up front unless `serve` says otherwise.
pub struct CallLines<L> {
    lines: L,
}

impl<L> CallLines<L> {
    /// Wraps the layer that writes the log lines.
    pub fn new(lines: L) -> Self {
        Self { lines }
    }

    /// The span of the call this thread runs, entered, when `event` is written inside a call
    /// and not already inside a span.
    fn enter_call<S>(
        &self,
        event: &tracing::Event<'_>,
        ctx: &Context<'_, S>,
    ) -> Option<tracing::span::EnteredSpan>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if !event.is_contextual() || ctx.lookup_current().is_some() {
            return None;
        }
        let span = CallSpan::current()?.span();
        Some(span.entered())
    }
}

impl<S, L> tracing_subscriber::Layer<S> for CallLines<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.lines.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.lines.on_layer(subscriber);
    }

    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.lines.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.lines.enabled(metadata, ctx)
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.lines.on_new_span(attrs, id, ctx);
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.lines.max_level_hint()
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.lines.on_record(span, values, ctx);
    }

    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.lines.on_follows_from(span, follows, ctx);
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) -> bool {
        self.lines.event_enabled(event, ctx)
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let _in_call = self.enter_call(event, &ctx);
        self.lines.on_event(event, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.lines.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.lines.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.lines.on_close(id, ctx);
    }

    fn on_id_change(&self, old: &tracing::span::Id, new: &tracing::span::Id, ctx: Context<'_, S>) {
        self.lines.on_id_change(old, new, ctx);
    }
}

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

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU64;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects the written lines.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Notes the request id of every span made.
    #[derive(Clone, Default)]
    struct SpansMade(Arc<Mutex<Vec<String>>>);

    impl tracing::field::Visit for SpansMade {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "request_id" {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{value:?}"));
            }
        }
    }

    impl<S: Subscriber> tracing_subscriber::Layer<S> for SpansMade {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: Context<'_, S>,
        ) {
            attrs.record(&mut self.clone());
        }
    }

    /// The lines written and the spans made under `serve`'s text line layer (without the
    /// time) at `info`, installed as the global subscriber as `serve` does: lines are made
    /// inside the dispatch of a line, which a scoped subscriber does not allow (see
    /// [`CallLines`]). Other tests' lines may land here too; each call has its own id.
    fn seen() -> &'static (Sink, SpansMade) {
        static SEEN: OnceLock<(Sink, SpansMade)> = OnceLock::new();
        SEEN.get_or_init(|| {
            let sink = Sink::default();
            let spans = SpansMade::default();
            let written = sink.clone();
            let subscriber = tracing_subscriber::registry()
                .with(tracing::level_filters::LevelFilter::INFO)
                .with(CallLines::new(
                    tracing_subscriber::fmt::layer()
                        .with_writer(move || written.clone())
                        .with_ansi(false)
                        .with_target(false)
                        .without_time(),
                ))
                .with(spans.clone());
            tracing::subscriber::set_global_default(subscriber)
                .expect("the only global subscriber of the unit tests");
            (sink, spans)
        })
    }

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    /// Runs one call and returns its lines (with its request id written `ID`) and the spans
    /// made for it. The call writes `lines` lines: one before its tenant is noted when
    /// `early`, the others after, the last from blocking work carried out of the call.
    fn run_call(eager: bool, early: bool, lines: usize) -> (String, usize) {
        static CALLS: AtomicU64 = AtomicU64::new(1);
        let (sink, spans) = seen();
        let id = format!("{:016x}", CALLS.fetch_add(1, Ordering::SeqCst));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let call = CallSpan::with_mode(
            eager,
            &id,
            "Encrypt",
            Some(RemoteParent {
                trace_id: TRACE_ID,
                span_id: "00f067aa0ba902b7",
                flags: 1,
            }),
        );
        let noted = call.clone();
        let blocking = runtime.block_on(
            async move {
                if early && lines > 0 {
                    tracing::info!("before the tenant");
                }
                noted.record_tenant("acme");
                tokio::task::yield_now().await;
                // Not enabled: no span is made for it.
                tracing::debug!("filtered out");
                let after = lines.saturating_sub(usize::from(early) + 1);
                for n in 0..after {
                    tracing::warn!(n, "after the tenant");
                }
                carry(move || {
                    if lines > 0 {
                        tracing::error!("from blocking work");
                    }
                })
            }
            .in_call(call),
        );
        // Outside the call: no call is named.
        tracing::warn!("outside {id}");
        blocking();
        let text = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("utf-8");
        let ours: Vec<String> = text
            .lines()
            .filter(|line| line.contains(&id))
            .map(|line| line.replace(&id, "ID"))
            .collect();
        let made = spans
            .0
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| **s == id)
            .count();
        (ours.join("\n"), made)
    }

    #[test]
    fn a_line_inside_a_call_names_it_as_when_the_span_is_made_up_front() {
        for early in [false, true] {
            let (lazy, lazy_spans) = run_call(false, early, 3);
            let (eager, eager_spans) = run_call(true, early, 3);
            assert_eq!(lazy, eager, "early {early}");
            assert_eq!((lazy_spans, eager_spans), (1, 1));
            let named = format!(
                "call{{request_id=ID op=\"Encrypt\" trace_id=\"{TRACE_ID}\" \
                 parent_span_id=\"00f067aa0ba902b7\" tenant=\"acme\"}}: "
            );
            let before = format!(
                " INFO call{{request_id=ID op=\"Encrypt\" trace_id=\"{TRACE_ID}\" \
                 parent_span_id=\"00f067aa0ba902b7\"}}: before the tenant"
            );
            let expected = [
                if early {
                    before
                } else {
                    format!(" WARN {named}after the tenant n=0")
                },
                format!(" WARN {named}after the tenant n={}", usize::from(!early)),
                " WARN outside ID".to_owned(),
                format!("ERROR {named}from blocking work"),
            ];
            assert_eq!(lazy, expected.join("\n"));
        }
    }

    #[test]
    fn a_call_that_writes_no_line_makes_no_span_unless_eager() {
        let (lazy, lazy_spans) = run_call(false, false, 0);
        assert_eq!((lazy.as_str(), lazy_spans), (" WARN outside ID", 0));
        let (eager, eager_spans) = run_call(true, false, 0);
        assert_eq!((eager.as_str(), eager_spans), (" WARN outside ID", 1));
    }
}
