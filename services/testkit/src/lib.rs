//! Test helpers for running against the real PostgreSQL, Redis and RabbitMQ, isolated per
//! test so tests run in parallel and leave nothing behind: a fresh database per test, a unique
//! Redis key prefix, a unique AMQP name prefix, and a TCP proxy a test can cut to simulate an
//! outage without touching the shared servers.
//!
//! Backends come from `TEST_DATABASE_URL`, `TEST_REDIS_URL` and `TEST_AMQP_URL` (defaults:
//! the local servers). A backend that cannot be reached fails the test loudly; nothing here
//! ever skips.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: failing loudly is the point

mod amqp;
mod database;
mod proxy;
mod redis_prefix;

pub use amqp::TestAmqp;
pub use database::TestDatabase;
pub use proxy::TcpProxy;
pub use redis_prefix::TestRedis;

/// The PostgreSQL server tests use (a maintenance URL; each test gets its own database).
pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".to_owned()
    })
}

/// The Redis server tests use.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// The RabbitMQ server tests use.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A short unique token for names.
pub fn unique(label: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}_{}", &id[..12], label)
}

/// Installs test logging (`TEST_LOG=1` shows it).
pub fn init_logging() {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug")),
            )
            .with_test_writer()
            .try_init();
    }
}

/// Runs `f` on a fresh runtime on another thread: cleanup from `Drop` cannot await.
pub(crate) fn block_on_thread<F>(f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(f),
            Err(error) => eprintln!("testkit cleanup: cannot start a runtime: {error}"),
        }
    });
    let _ = handle.join();
}
