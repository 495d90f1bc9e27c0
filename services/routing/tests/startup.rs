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

/// During a rolling upgrade the previous release still starts after the new one migrated: a
/// migration it does not know is no reason to refuse, and its own pending ones still apply.
#[tokio::test]
async fn migrations_of_a_newer_release_do_not_stop_the_previous_one() {
    let db = shopctrl_testkit::TestDatabase::create().await;
    let mut settings = Settings::defaults();
    settings.database_url = shopctrl_routing::settings::Redacted::new(db.url());
    shopctrl_routing::migrate(&settings).await.unwrap();
    let mut conn = db.connection().await;
    // A newer release's migration is recorded; this release's last one is undone.
    sqlx::raw_sql(
        "insert into routing._sqlx_migrations
             (version, description, success, checksum, execution_time)
         values (99999999, 'from a newer release', true, '\\x00', 0);
         delete from routing._sqlx_migrations where version = 5;
         drop index routing.conversations_queue;
         create index conversations_waiting on routing.conversations (shop_id, waiting_since)
             where state = 'waiting_for_employee';",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    shopctrl_routing::migrate(&settings).await.unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "select indexname::text from pg_indexes
         where schemaname = 'routing' and indexname in ('conversations_queue', 'conversations_waiting')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(indexes, vec!["conversations_queue".to_owned()]);
}
