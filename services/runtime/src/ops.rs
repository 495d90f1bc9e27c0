use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Named readiness checks; `/readyz` answers 200 only when all of them are up.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<RwLock<BTreeMap<&'static str, Arc<AtomicBool>>>>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Registers a check (initially down) and returns its switch.
    pub fn check(&self, name: &'static str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut checks) = self.checks.write() {
            checks.insert(name, flag.clone());
        }
        flag
    }

    /// Marks the service as draining: not ready, so Kubernetes stops sending traffic.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Each check's state, and whether all are up.
    pub fn snapshot(&self) -> (bool, BTreeMap<&'static str, bool>) {
        let states: BTreeMap<&'static str, bool> = match self.checks.read() {
            Ok(checks) => checks
                .iter()
                .map(|(name, flag)| (*name, flag.load(Ordering::SeqCst)))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let ready = !self.draining.load(Ordering::SeqCst) && states.values().all(|up| *up);
        (ready, states)
    }
}

/// Why the operations server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot bind the operations listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("operations server failed: {0}")]
    Serve(std::io::Error),
}

#[derive(Clone)]
struct OpsState {
    service: &'static str,
    readiness: Readiness,
    registry: Arc<Registry>,
}

/// The `/healthz`, `/readyz`, `/metrics` server of one service, bound and ready to run.
pub struct OpsServer {
    listener: TcpListener,
    router: Router,
}

impl OpsServer {
    /// Binds the listener (port 0 picks a free port, as tests do).
    pub async fn bind(
        addr: SocketAddr,
        service: &'static str,
        readiness: Readiness,
        registry: Arc<Registry>,
    ) -> Result<Self, OpsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| OpsError::Bind { addr, source })?;
        let state = OpsState {
            service,
            readiness,
            registry,
        };
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state);
        Ok(Self { listener, router })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), OpsError> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(OpsError::Serve)
    }
}

async fn healthz(State(state): State<OpsState>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok", "service": state.service }))
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let (ready, checks) = state.readiness.snapshot();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if ready { "ready" } else { "not ready" },
            "service": state.service,
            "checks": checks,
        })),
    )
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics encoding failed".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() -> Result<(), Box<dyn std::error::Error>> {
        let readiness = Readiness::default();
        let broker = readiness.check("broker");
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("demo_events", "Demo events", counter.clone());
        counter.inc();
        let server = OpsServer::bind(
            "127.0.0.1:0".parse()?,
            "demo",
            readiness.clone(),
            Arc::new(registry),
        )
        .await?;
        let addr = server.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        let client = reqwest::Client::new();

        let health = client.get(format!("http://{addr}/healthz")).send().await?;
        assert_eq!(health.status(), 200);
        let not_ready = client.get(format!("http://{addr}/readyz")).send().await?;
        assert_eq!(not_ready.status(), 503);
        broker.store(true, Ordering::SeqCst);
        let ready = client.get(format!("http://{addr}/readyz")).send().await?;
        assert_eq!(ready.status(), 200);
        readiness.set_draining();
        let draining = client.get(format!("http://{addr}/readyz")).send().await?;
        assert_eq!(draining.status(), 503);
        let metrics = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        assert!(metrics.contains("demo_events_total 1"), "{metrics}");

        stop.cancel();
        task.await??;
        Ok(())
    }
}
