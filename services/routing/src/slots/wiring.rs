//! Settings and construction of the slot engine for the routing binary: the seam's
//! [`SlotAssigner`] plus the periodic drift check.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{SlotAssigner, SlotEngine, SlotError, SlotMetrics, SlotService, SlotSettings};

/// Slot engine settings (flattened into routing's settings).
#[derive(Debug, Clone, clap::Args)]
pub struct SlotsArgs {
    /// Redis holding the slot counters (a cache of PostgreSQL, rebuilt when lost).
    #[arg(
        long,
        env = "REDIS_URL",
        global = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,

    /// Prefix of every slot key (before the `{slots}` hash tag); for shared Redis servers.
    #[arg(long, env = "SLOTS_KEY_PREFIX", global = true, default_value = "")]
    pub slots_key_prefix: String,

    /// How long a claim counts before its PostgreSQL commit confirms it (crash safety).
    #[arg(
        long,
        env = "SLOTS_PENDING_TTL_SECONDS",
        global = true,
        default_value_t = 15
    )]
    pub slots_pending_ttl_seconds: u64,

    /// Interval of the check that compares Redis with PostgreSQL and repairs drift.
    #[arg(
        long,
        env = "SLOTS_DRIFT_CHECK_SECONDS",
        global = true,
        default_value_t = 30
    )]
    pub slots_drift_check_seconds: u64,

    /// Lease of the replica rebuilding the slot data after Redis lost it.
    #[arg(
        long,
        env = "SLOTS_REBUILD_LEASE_SECONDS",
        global = true,
        default_value_t = 30
    )]
    pub slots_rebuild_lease_seconds: u64,
}

static METRICS: LazyLock<SlotMetrics> = LazyLock::new(SlotMetrics::default);

/// The process's slot metrics (registered once with the ops registry).
pub fn metrics() -> &'static SlotMetrics {
    &METRICS
}

/// Connects to Redis and builds the assigner; flow events go to `flow_exchange`. The drift
/// check (which also rebuilds the slot data after a loss) runs in the background until the
/// assigner is dropped.
///
/// Without `SLOTS_KEY_PREFIX` the keys live under `<database name>:`, so every deployment
/// (and every test database) sharing a Redis server has its own slot data.
pub async fn build(
    pool: &PgPool,
    args: &SlotsArgs,
    flow_exchange: String,
) -> Result<Arc<SlotAssigner>, SlotError> {
    let prefix = if args.slots_key_prefix.is_empty() {
        let database: String = sqlx::query_scalar("select current_database()")
            .fetch_one(pool)
            .await?;
        format!("{database}:")
    } else {
        args.slots_key_prefix.clone()
    };
    let engine = SlotEngine::connect(
        &args.redis_url,
        &prefix,
        Duration::from_secs(args.slots_pending_ttl_seconds.max(1)),
    )
    .await?;
    let mut settings = SlotSettings::new(flow_exchange);
    settings.rebuild_lease = Duration::from_secs(args.slots_rebuild_lease_seconds.max(1));
    let svc = SlotService::new(pool.clone(), engine, settings, metrics().clone());
    let stop = CancellationToken::new();
    tokio::spawn(svc.clone().run_maintenance(
        Duration::from_secs(args.slots_drift_check_seconds.max(1)),
        stop.clone(),
    ));
    Ok(Arc::new(SlotAssigner::new(svc).stopping_on_drop(stop)))
}
