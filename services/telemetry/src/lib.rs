//! Telemetry for every ShopCtrl Messaging service: JSON logs on stdout, OpenTelemetry traces
//! exported over OTLP when the standard `OTEL_*` variables ask for it, and W3C trace context
//! carried through HTTP and AMQP headers so one trace runs webhook → routing → callback.

mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

pub use propagation::{
    extract_context, extract_from_http, inject_current, set_parent_from_headers,
};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(String),
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Log output format, from `LOG_FORMAT` (`json`, the default, or `text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    pub fn from_env() -> Self {
        match std::env::var("LOG_FORMAT").as_deref() {
            Ok("text") | Ok("pretty") => Self::Text,
            _ => Self::Json,
        }
    }
}

/// Keeps the trace exporter alive; call [`TelemetryGuard::shutdown`] at exit to flush spans.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops the exporter. Safe to call when tracing export is off.
    pub fn shutdown(mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
    }
}

/// Whether the standard variables ask for OTLP export.
fn otlp_requested() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let endpoint = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()));
    endpoint && !disabled
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), JSON or text logs, and
/// the OpenTelemetry layer when an OTLP endpoint is configured. Exporter settings (endpoint,
/// headers, timeout), sampler (`OTEL_TRACES_SAMPLER[_ARG]`) and resource (`OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`) come from the standard variables; `service_name` is the
/// fallback name.
pub fn init(service_name: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new("info"))
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;

    let provider = if otlp_requested() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(service_name);
        }
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource.build())
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };
    let otel_layer = provider.as_ref().map(|p| {
        let tracer = p.tracer(service_name);
        opentelemetry::global::set_tracer_provider(p.clone());
        // Only spans about our work: the AMQP client's connection loop and the HTTP/2 internals
        // would each start a trace of their own and bury the request traces.
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                ![
                    "lapin",
                    "h2",
                    "hyper",
                    "tower",
                    "sqlx",
                    "redis",
                    "amq_protocol",
                ]
                .iter()
                .any(|noisy| meta.target().starts_with(noisy))
            }))
    });

    let (json, text) = match LogFormat::from_env() {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ),
            None,
        ),
        LogFormat::Text => (None, Some(tracing_subscriber::fmt::layer())),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(json)
        .with(text)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// For tests: logs to the test writer when `TEST_LOG` is set, otherwise nowhere. Installs the
/// W3C propagator either way. Safe to call from every test.
pub fn init_for_tests() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug")),
            )
            .with_test_writer()
            .try_init();
    }
}
