//! Command line and environment: every setting has an environment variable and a default that
//! works against the local infrastructure, so `routing --help` is the reference.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand};

/// `routing`: the ShopCtrl Messaging routing service.
#[derive(Debug, Parser)]
#[command(
    name = "routing",
    version,
    about = "ShopCtrl Messaging routing: turns inbound MessageBird events into conversations, \
             customers and messages, and serves the agent API over gRPC",
    after_help = "Also read: RUST_LOG (log filter, default info), LOG_FORMAT (json|text), \
                  OTEL_EXPORTER_OTLP_ENDPOINT and the other standard OTEL_* variables."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

/// What to do.
#[derive(Debug, Clone, Copy, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Create the schema, run the migrations, then serve (the default).
    Serve,
    /// Create the schema and run the migrations, then exit.
    Migrate,
}

/// Every setting of the routing service.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// PostgreSQL database; routing uses its own schema `routing` in it.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/shopctrl_messaging?sslmode=disable"
    )]
    pub database_url: Redacted,

    /// Maximum number of PostgreSQL connections of this replica: at least ROUTING_SHARDS + 8
    /// (one per shard consumer; the rest serve the sequencer, the outbox relay, the side
    /// consumers, slot maintenance and the API). Fewer is refused at start.
    #[arg(
        long,
        env = "DATABASE_MAX_CONNECTIONS",
        global = true,
        default_value_t = 16
    )]
    pub database_max_connections: u32,

    /// RabbitMQ broker.
    #[arg(
        long,
        env = "AMQP_URL",
        global = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: Redacted,

    /// Prefix of every exchange and queue name (tests and shared brokers).
    #[arg(long, env = "AMQP_PREFIX", global = true, default_value = "")]
    pub amqp_prefix: String,

    /// Number of inbound shard queues; must equal ingress's ROUTING_SHARDS.
    #[arg(long, env = "ROUTING_SHARDS", global = true, default_value_t = 4)]
    pub routing_shards: u32,

    /// Unacked deliveries a shard consumer holds (AMQP prefetch).
    #[arg(long, env = "ROUTING_PREFETCH", global = true, default_value_t = 512)]
    pub routing_prefetch: u16,

    /// Most inbound events committed in one transaction and acked with one `multiple` ack.
    #[arg(long, env = "ROUTING_BATCH_SIZE", global = true, default_value_t = 128)]
    pub routing_batch_size: usize,

    /// Tries of an event that violates a rule before it is dead-lettered.
    #[arg(long, env = "ROUTING_MAX_ATTEMPTS", global = true, default_value_t = 3)]
    pub routing_max_attempts: u32,

    /// Where the gRPC API listens.
    #[arg(
        long,
        env = "GRPC_LISTEN_ADDR",
        global = true,
        default_value = "0.0.0.0:50052"
    )]
    pub grpc_listen_addr: SocketAddr,

    /// Where /healthz, /readyz and /metrics listen.
    #[arg(
        long,
        env = "OPS_LISTEN_ADDR",
        global = true,
        default_value = "0.0.0.0:9102"
    )]
    pub ops_listen_addr: SocketAddr,

    /// Service tokens, `caller=token,...`; only the caller `shopctrl` may use the agent API.
    /// Unset: development tokens (dev-<caller>-token) and a warning.
    #[arg(long, env = "AUTH_TOKENS", global = true)]
    pub auth_tokens: Option<Redacted>,

    /// The config service's gRPC endpoint.
    #[arg(
        long,
        env = "CONFIG_GRPC_URL",
        global = true,
        default_value = "http://127.0.0.1:50051"
    )]
    pub config_grpc_url: String,

    /// routing's token for the config service. Unset: dev-routing-token and a warning.
    #[arg(long, env = "CONFIG_SERVICE_TOKEN", global = true)]
    pub config_service_token: Option<Redacted>,

    /// A shop's local copy of config data older than this is fetched again (a safety net
    /// behind the ConfigChanged events).
    #[arg(
        long,
        env = "CONFIG_REFRESH_SECONDS",
        global = true,
        default_value_t = 600
    )]
    pub config_refresh_seconds: u64,

    /// How long a shutdown may take before in-flight work is abandoned.
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_SECONDS",
        global = true,
        default_value_t = 20
    )]
    pub shutdown_grace_seconds: u64,

    /// Slot claims (Redis): REDIS_URL and SLOTS_*.
    #[command(flatten)]
    pub slots: crate::slots::wiring::SlotsArgs,
}

impl Settings {
    /// The settings as they would be with no flags (for tests, which then point them at
    /// their own database and broker prefix).
    pub fn defaults() -> Self {
        // Parsing an empty command line cannot fail: every field has a default or is optional.
        match Cli::try_parse_from(["routing"]) {
            Ok(cli) => cli.settings,
            Err(error) => unreachable!("defaults must parse: {error}"),
        }
    }

    pub fn config_refresh(&self) -> Duration {
        Duration::from_secs(self.config_refresh_seconds)
    }
}

/// A string that never shows up in logs or `Debug` output (URLs with passwords, tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}
