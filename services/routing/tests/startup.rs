//! Settings routing refuses at start, before it touches any backend: the error names the
//! setting, so an operator fixes the deployment instead of watching the service crawl.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly

use shopctrl_routing::{App, Overrides, Settings, StartError, app::RESERVED_CONNECTIONS};

#[tokio::test]
async fn too_few_database_connections_for_the_shards_are_refused_at_start() {
    let mut settings = Settings::defaults();
    settings.routing_shards = 16;
    settings.database_max_connections = 16;
    // Nothing listens there: the refusal must come before any connection attempt.
    settings.database_url = shopctrl_routing::settings::Redacted::new(
        "postgres://postgres@127.0.0.1:1/nothing?sslmode=disable",
    );
    let error = App::build(settings, Overrides::default())
        .await
        .err()
        .expect("16 shards on 16 connections must be refused");
    match error {
        StartError::Setting { name, reason } => {
            assert_eq!(name, "DATABASE_MAX_CONNECTIONS");
            let needed = 16 + RESERVED_CONNECTIONS;
            assert!(reason.contains(&format!("at least {needed}")), "{reason}");
            assert!(reason.contains("ROUTING_SHARDS=16"), "{reason}");
        }
        other => panic!("expected a settings error, got {other}"),
    }
}
