//! Every setting of the ingress, from flags or environment variables (`ingress --help` lists
//! them with their defaults, which work against the local stack).

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ingress",
    version,
    about = "Verifies MessageBird webhooks and flow handovers and publishes them to RabbitMQ with confirms"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (the default).
    Serve,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Public HTTP listener (webhooks, handovers).
    #[arg(long, env = "HTTP_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub http_listen_addr: SocketAddr,
    /// Operations listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "OPS_LISTEN_ADDR", default_value = "0.0.0.0:9103")]
    pub ops_listen_addr: SocketAddr,
    /// The public base URL MessageBird calls (scheme://host[:port][/prefix]); the JWT url_hash
    /// is checked against this plus the raw request target.
    #[arg(long, env = "PUBLIC_BASE_URL", default_value = "http://127.0.0.1:8080")]
    pub public_base_url: String,
    /// Largest accepted body; larger gets 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// Accept the deprecated MessageBird-Signature scheme for every shop (otherwise only for
    /// shops whose settings enable it).
    #[arg(long, env = "LEGACY_SIGNATURE_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub legacy_signature_enabled: bool,
    /// Legacy scheme: how far the request timestamp may be from now, either way.
    #[arg(long, env = "LEGACY_REPLAY_WINDOW_SECONDS", default_value_t = 30)]
    pub legacy_replay_window_seconds: u32,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "AMQP_PREFIX", default_value = "")]
    pub amqp_prefix: String,
    /// How long to wait for a publisher confirm before answering 503.
    #[arg(long, env = "PUBLISH_CONFIRM_TIMEOUT_MS", default_value_t = 5_000)]
    pub publish_confirm_timeout_ms: u64,
    /// Number of routing shards N (must equal routing's).
    #[arg(long, env = "ROUTING_SHARDS", default_value_t = 4)]
    pub routing_shards: u32,
    /// Replay memory (token ids).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// Prefix of the replay-memory keys.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "ingress:")]
    pub redis_key_prefix: String,
    /// Per-command Redis timeout; past it the request is published without the replay check.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 250)]
    pub redis_timeout_ms: u64,
    #[arg(
        long,
        env = "CONFIG_GRPC_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub config_grpc_url: String,
    /// Service token for the config service (caller `ingress`).
    #[arg(
        long,
        env = "CONFIG_SERVICE_TOKEN",
        default_value = "dev-ingress-token",
        hide_env_values = true
    )]
    pub config_service_token: String,
    #[arg(long, env = "CONFIG_TIMEOUT_MS", default_value_t = 2_000)]
    pub config_timeout_ms: u64,
    /// Cached shop secrets are refreshed after this long (served stale if config is down).
    #[arg(long, env = "KEY_CACHE_TTL_SECONDS", default_value_t = 300)]
    pub key_cache_ttl_seconds: u64,
    /// Unknown shops are remembered this long.
    #[arg(long, env = "KEY_CACHE_NEGATIVE_TTL_SECONDS", default_value_t = 30)]
    pub key_cache_negative_ttl_seconds: u64,
    /// The header a flow sends the shop's handover secret in (or `Authorization: Bearer`).
    #[arg(
        long,
        env = "HANDOVER_SECRET_HEADER",
        default_value = "x-handover-secret"
    )]
    pub handover_secret_header: String,
    /// Retry-After on 503 answers.
    #[arg(long, env = "RETRY_AFTER_SECONDS", default_value_t = 5)]
    pub retry_after_seconds: u32,
    /// Requests handled at once; more get 503 with Retry-After at once instead of queueing.
    /// Bounds memory (at most this many bodies of up to MAX_BODY_BYTES) and keeps the latency
    /// of accepted requests flat when MessageBird sends faster than the broker confirms.
    #[arg(long, env = "MAX_IN_FLIGHT_REQUESTS", default_value_t = 512)]
    pub max_in_flight_requests: usize,
    /// Connections served at once on the public listener; more wait in the accept backlog.
    /// Each open connection holds about 23 KiB, so this bounds the memory connections take.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// A connection that moves no byte for this long is closed. Longer than common load
    /// balancer idle timeouts (60 s), so the balancer closes first; never shorter than
    /// [`Settings::connection_idle`] allows.
    #[arg(long, env = "CONNECTION_IDLE_SECONDS", default_value_t = 75)]
    pub connection_idle_seconds: u64,
    /// Longest wait for in-flight requests at shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
}

impl Settings {
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_confirm_timeout_ms)
    }

    /// The idle limit of a connection. The server also reads while a request is handled (to
    /// notice a client that went away), so a request that waits on the config service, Redis
    /// and the broker in turn moves no byte meanwhile: the limit is raised to that longest
    /// wait plus a second, so it can only close connections nobody is using.
    pub fn connection_idle(&self) -> Duration {
        let longest_request = Duration::from_millis(
            self.config_timeout_ms
                .saturating_add(self.redis_timeout_ms)
                .saturating_add(self.publish_confirm_timeout_ms),
        ) + Duration::from_secs(1);
        Duration::from_secs(self.connection_idle_seconds).max(longest_request)
    }

    /// Defaults for tests: listeners on port 0, everything else as `--help` says.
    pub fn for_tests() -> Self {
        let mut settings = Cli::parse_from(["ingress"]).settings;
        settings.http_listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.ops_listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_limit_never_cuts_a_request_that_is_still_waiting() {
        let mut settings = Settings::for_tests();
        assert_eq!(settings.connection_idle(), Duration::from_secs(75));
        settings.connection_idle_seconds = 1;
        settings.config_timeout_ms = 2_000;
        settings.redis_timeout_ms = 250;
        settings.publish_confirm_timeout_ms = 5_000;
        assert_eq!(settings.connection_idle(), Duration::from_millis(8_250));
    }
}
