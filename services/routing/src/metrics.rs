//! routing's Prometheus metrics (names as in the helm dashboard).

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// The handles every part of routing updates.
#[derive(Clone)]
pub struct Metrics {
    events: Family<Outcome, Counter>,
    dead_lettered: Family<QueueLabel, Counter>,
    commit_latency: Histogram,
    pub outbox_pending: Gauge,
    pub employee_events_unnumbered: Gauge,
    registry: Arc<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        crate::slots::wiring::metrics().register(&mut registry);
        let events = Family::<Outcome, Counter>::default();
        registry.register(
            "routing_events",
            "Inbound events by outcome (applied, dead_lettered, transient_error)",
            events.clone(),
        );
        let dead_lettered = Family::<QueueLabel, Counter>::default();
        registry.register(
            "amqp_consumer_dead_lettered",
            "Messages dead-lettered by a consumer",
            dead_lettered.clone(),
        );
        let commit_latency = Histogram::new([
            0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "routing_inbound_commit_seconds",
            "From ingress receiving a webhook to routing committing its effect",
            commit_latency.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            "outbox_pending",
            "Outbox events not yet published",
            outbox_pending.clone(),
        );
        let employee_events_unnumbered = Gauge::default();
        registry.register(
            "routing_employee_events_unnumbered",
            "Employee events committed but not yet numbered by the sequencer",
            employee_events_unnumbered.clone(),
        );
        Self {
            events,
            dead_lettered,
            commit_latency,
            outbox_pending,
            employee_events_unnumbered,
            registry: Arc::new(registry),
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn event(&self, outcome: &str, n: u64) {
        if n > 0 {
            self.events
                .get_or_create(&Outcome {
                    outcome: outcome.to_owned(),
                })
                .inc_by(n);
        }
    }

    pub fn dead_lettered(&self, queue: &str) {
        self.dead_lettered
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .inc();
    }

    pub fn commit_latency(&self, seconds: f64) {
        self.commit_latency.observe(seconds.max(0.0));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
