//! Prometheus metrics, named as on the operations dashboard.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;

/// Every outcome label of `flow_callback_deliveries_total`.
pub const OUTCOMES: [&str; 8] = [
    "delivered",
    "retried",
    "stale",
    "refused",
    "failed",
    "skipped",
    "duplicate",
    "gave_up",
];

fn attempt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

/// The service's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    deliveries: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    attempt_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            deliveries: Family::default(),
            dead_lettered: Family::default(),
            attempt_seconds: Family::new_with_constructor(attempt_histogram),
        };
        registry.register(
            "flow_callback_deliveries",
            "Messages handled, by kind (flow, send) and outcome (delivered, retried, stale, refused, failed, skipped, duplicate, gave_up)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "flow_callback_dead_lettered",
            "Messages moved to the dead-letter queue, by kind",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "flow_callback_attempt_seconds",
            "Duration of one HTTP delivery attempt, by kind",
            metrics.attempt_seconds.clone(),
        );
        // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
        for kind in ["flow", "send"] {
            for outcome in OUTCOMES {
                let _ = metrics
                    .deliveries
                    .get_or_create(&vec![("kind", kind), ("outcome", outcome)]);
            }
            let _ = metrics.dead_lettered.get_or_create(&vec![("kind", kind)]);
        }
        metrics
    }

    pub fn outcome(&self, kind: &'static str, outcome: &'static str) {
        self.deliveries
            .get_or_create(&vec![("kind", kind), ("outcome", outcome)])
            .inc();
    }

    pub fn dead_lettered(&self, kind: &'static str) {
        self.dead_lettered
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    pub fn attempt(&self, kind: &'static str, seconds: f64) {
        self.attempt_seconds
            .get_or_create(&vec![("kind", kind)])
            .observe(seconds);
    }

    /// How many messages ended with this outcome so far (tests read it).
    pub fn count(&self, kind: &'static str, outcome: &'static str) -> u64 {
        self.deliveries
            .get_or_create(&vec![("kind", kind), ("outcome", outcome)])
            .get()
    }
}
