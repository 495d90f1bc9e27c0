//! What every ShopCtrl Messaging service runs beside its real work: graceful shutdown on
//! SIGTERM/SIGINT, and the operations HTTP server with `/healthz` (alive), `/readyz` (every
//! readiness check passes) and `/metrics` (Prometheus text format); and the service tokens
//! (`AUTH_TOKENS`) its gRPC callers authenticate with.

mod ops;
mod shutdown;
pub mod tokens;

pub use ops::{OpsError, OpsServer, Readiness};
pub use shutdown::{shutdown_on_signal, wait_with_grace};
