//! Logging: tracing-subscriber, human or JSON, filtered by `RUST_LOG`;
//! colour only on a terminal; and, when `tracing.otlp_endpoint` is set,
//! OpenTelemetry traces exported over OTLP/gRPC. With no endpoint no
//! OpenTelemetry layer is installed at all, so spans cost what they cost
//! without it.

use std::io::IsTerminal;

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TracingConfig};

const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    init_with(format, None);
}

/// Exports spans while alive; `shutdown` flushes what is buffered.
pub struct TraceGuard(Option<SdkTracerProvider>);

impl TraceGuard {
    /// Flushes and stops the exporter (bounded by the SDK's export
    /// timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.0 {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "cannot flush traces");
            }
        }
    }
}

/// Installs the global subscriber, with OpenTelemetry export when
/// `tracing` has an endpoint. Call once, from `main`, inside the runtime
/// (the OTLP channel starts its worker on it).
pub fn init_with(format: LogFormat, tracing: Option<&TracingConfig>) -> TraceGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (provider, error) = match tracing.and_then(|t| t.otlp_endpoint.as_ref().map(|e| (t, e))) {
        Some((config, endpoint)) => match tracer_provider(config, endpoint) {
            Ok(provider) => (Some(provider), None),
            Err(err) => (None, Some(err)),
        },
        None => (None, None),
    };
    let otel = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer().with_tracer(provider.tracer("actionsd"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(use_colour())
                    .fmt_fields(EscapedFields),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(use_colour())
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .init(),
    }
    if let Some(err) = error {
        tracing::warn!(error = %err, "cannot set up trace export; traces are off");
    }
    TraceGuard(provider)
}

fn tracer_provider(
    config: &TracingConfig,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(config.export_timeout)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build())
}

/// Opens a server span per request whose parent is the request's W3C
/// `traceparent` (and `tracestate`), on every protocol: the headers are
/// read before the gRPC-Web and Connect adapters, and gRPC metadata are
/// HTTP/2 headers. Installed only when traces are exported.
#[derive(Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContext { inner }
    }
}

#[derive(Clone)]
pub struct TraceContext<S> {
    inner: S,
}

/// Reads propagation headers from an HTTP header map.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

impl<S, B> tower::Service<http::Request<B>> for TraceContext<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        let span = tracing::info_span!(
            "request",
            otel.name = %request.uri().path(),
            otel.kind = "server",
        );
        let _ = span.set_parent(parent);
        self.inner.call(request).instrument(span)
    }
}

/// Colour only on a terminal, and never with `NO_COLOR` set to anything
/// but the empty string (<https://no-color.org>): logs written to a file or
/// a pipe stay greppable. Logs go to standard output.
fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The human format's fields (`message name=value …`, as tracing's default
/// formatter writes them), with control characters in every value escaped:
/// identifiers come from clients, and a raw newline or ANSI escape in one
/// would forge log lines or repaint the terminal. The JSON format escapes
/// by itself.
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{}", Escaped(value))
        } else {
            write!(
                self.writer,
                "{separator}{}={}",
                field.name(),
                Escaped(value)
            )
        };
    }
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// Writes a string with its control characters (newlines, escapes, NUL …)
/// as Rust escapes (`\n`, `\u{1b}`).
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                for escaped in c.escape_default() {
                    f.write_char(escaped)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An identifier carrying a newline and an ANSI escape, logged the way
    /// actionsd logs identifiers (`%` in an event and in a span), stays on
    /// one line with no escape byte in it.
    #[test]
    fn human_logs_escape_control_characters_in_identifiers() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .with_writer(move || writer.clone())
            .finish();
        let forged = "r1\n2026-12-01T00:00:00Z  INFO actionsd: forged \x1b[31mred";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", action = %forged);
            span.in_scope(|| tracing::info!(action = %forged, name = forged, "leased {forged}"));
        });
        let output = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(output.lines().count(), 1, "{output}");
        assert!(!output.contains('\x1b'), "{output}");
        assert!(output.contains(r"r1\n2026-12-01"), "{output}");
        assert!(output.contains(r"\u{1b}[31mred"), "{output}");
    }
}
