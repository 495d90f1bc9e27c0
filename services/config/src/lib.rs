//! The ShopCtrl Messaging config service: each shop's messaging settings (with its secrets
//! encrypted at rest), employees' roles, Chat permissions and conversation slots, served over
//! gRPC to ShopCtrl (admin API, checked against the acting employee's role) and to our own
//! services (internal API, scoped by service token). PostgreSQL (schema `config`) is the record;
//! every change also writes a ConfigChanged event to the outbox, relayed to the RabbitMQ
//! fan-out exchange so every replica of every service can drop its caches.
//!
//! Shape: [`Settings`] (clap, every value from the environment too), [`App::build`] (connect,
//! migrate, bind) and [`App::run`] (serve until the shutdown token, then drain).

mod app;
mod auth;
pub mod crypto;
mod error;
mod metrics;
mod service;
mod settings;
mod store;
pub mod validate;

pub use app::{App, SCHEMA, connect_and_migrate, load_key_ring};
pub use auth::{Caller, EMPLOYEE_HEADER};
pub use settings::{Cli, Command, Redacted, Settings};

/// Re-encrypts every stored secret with the active key (the `reencrypt-secrets` subcommand).
pub async fn reencrypt_secrets(settings: &Settings) -> anyhow::Result<u64> {
    let pool = connect_and_migrate(settings).await?;
    let keys = std::sync::Arc::new(load_key_ring(settings)?);
    let store = store::Store::new(pool.clone(), keys, String::new());
    let rewritten = store.reencrypt_all().await?;
    pool.close().await;
    Ok(rewritten)
}
