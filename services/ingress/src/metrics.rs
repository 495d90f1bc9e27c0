//! Prometheus metrics of the ingress (names as the Helm dashboard and alerts use them), and
//! the throttle of warnings that every request would otherwise log during an outage.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// Every metric the ingress exports.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RouteStatus, Counter>,
    pub refusals: Family<Reason, Counter>,
    pub publish_seconds: Histogram,
    pub in_flight: Gauge,
    pub open_connections: Gauge,
    pub published: Family<Kind, Counter>,
    pub replays: Counter,
    pub replay_store_errors: Counter,
    pub config_lookup_errors: Counter,
    pub config_events: Counter,
    /// Replay-memory warnings: during a Redis outage every request fails the same way, so one
    /// line a second is logged and the counter says how many.
    pub replay_warning: Arc<LogThrottle>,
}

/// Lets one log line through per second.
#[derive(Debug, Default)]
pub struct LogThrottle {
    last_second: AtomicI64,
}

impl LogThrottle {
    /// Whether to log now (`now`: unix seconds): true for the first call of each second.
    pub fn allow(&self, now: i64) -> bool {
        let last = self.last_second.load(Ordering::Relaxed);
        last != now
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            refusals: Family::default(),
            // 0.5 ms .. ~1 s: confirms take ~0.4 ms idle, tens of ms under load or slow disks.
            publish_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            in_flight: Gauge::default(),
            open_connections: Gauge::default(),
            published: Family::default(),
            replays: Counter::default(),
            replay_store_errors: Counter::default(),
            config_lookup_errors: Counter::default(),
            config_events: Counter::default(),
            replay_warning: Arc::new(LogThrottle::default()),
        };
        registry.register(
            "ingress_requests",
            "HTTP requests by route and status",
            metrics.requests.clone(),
        );
        registry.register(
            "ingress_refusals",
            "Requests refused, by reason (signature checks, body, shop, broker)",
            metrics.refusals.clone(),
        );
        registry.register(
            "ingress_publish_seconds",
            "Time from publish to broker confirm",
            metrics.publish_seconds.clone(),
        );
        registry.register(
            "ingress_in_flight",
            "Requests being handled now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "ingress_open_connections",
            "Connections open on the public listener (at most MAX_CONNECTIONS)",
            metrics.open_connections.clone(),
        );
        registry.register(
            "ingress_published",
            "Events published and confirmed, by kind",
            metrics.published.clone(),
        );
        registry.register(
            "ingress_replays",
            "Verified requests whose token id was already seen (answered 200, not published)",
            metrics.replays.clone(),
        );
        registry.register(
            "ingress_replay_store_errors",
            "Replay-memory (Redis) failures; the request was published anyway",
            metrics.replay_store_errors.clone(),
        );
        registry.register(
            "ingress_config_lookup_errors",
            "Config service lookups that failed",
            metrics.config_lookup_errors.clone(),
        );
        registry.register(
            "ingress_config_events",
            "ConfigChanged events received (cache drops)",
            metrics.config_events.clone(),
        );
        metrics
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refusals.get_or_create(&Reason { reason }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_line_through_per_second() {
        let throttle = LogThrottle::default();
        assert!(throttle.allow(100));
        assert!(!throttle.allow(100));
        assert!(!throttle.allow(100));
        assert!(throttle.allow(101));
        assert!(!throttle.allow(101));
    }
}
