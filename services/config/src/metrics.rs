//! Prometheus metrics of the config service: gRPC requests by method and status code, and the
//! number of config-changed events still waiting in the outbox.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    code: String,
}

/// Handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    outbox_pending: Gauge,
    registry: Arc<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "config_grpc_requests",
            "gRPC requests answered, by method and status code",
            requests.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            "outbox_pending",
            "Config-changed events committed but not yet confirmed by RabbitMQ",
            outbox_pending.clone(),
        );
        Self {
            requests,
            outbox_pending,
            registry: Arc::new(registry),
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, method: &str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    pub fn set_outbox_pending(&self, pending: i64) {
        self.outbox_pending.set(pending);
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
