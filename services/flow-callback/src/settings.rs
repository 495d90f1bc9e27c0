//! Every setting of the service, from flags or environment variables (`--help` lists them with
//! their defaults, which work against a local stack).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    retry::{RetryPolicy, RetryPolicyError, parse_duration_list},
    ssrf::{SsrfPolicy, SsrfPolicyError},
};

/// Command line of the `flow-callback` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "flow-callback",
    version,
    about = "Delivers availability events to MessageBird flows and agent replies to the MessageBird Conversations API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Consume and deliver until SIGTERM (the default).
    Serve,
}

/// The service's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// RabbitMQ connection URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name (tests and side-by-side stacks).
    #[arg(long, env = "AMQP_PREFIX", default_value = "")]
    pub amqp_prefix: String,
    /// How long to wait for the broker's publish confirm, in milliseconds.
    #[arg(long, env = "AMQP_CONFIRM_TIMEOUT_MS", default_value_t = 5000)]
    pub amqp_confirm_timeout_ms: u64,
    /// The config service's gRPC endpoint (shop delivery settings).
    #[arg(
        long,
        env = "CONFIG_GRPC_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub config_grpc_url: String,
    /// Bearer token of the `flow-callback` caller at the config service.
    #[arg(
        long,
        env = "CONFIG_SERVICE_TOKEN",
        default_value = DEV_CONFIG_TOKEN,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub config_service_token: String,
    /// Timeout of one config call, in milliseconds.
    #[arg(long, env = "CONFIG_TIMEOUT_MS", default_value_t = 3000)]
    pub config_timeout_ms: u64,
    /// How long shop settings stay cached when no config-changed event dropped them, in seconds.
    #[arg(long, env = "SHOP_CACHE_TTL_SECONDS", default_value_t = 300)]
    pub shop_cache_ttl_seconds: u64,
    /// Base URL of the MessageBird Conversations API.
    #[arg(
        long,
        env = "MESSAGEBIRD_API_BASE_URL",
        default_value = "https://conversations.messagebird.com"
    )]
    pub messagebird_api_base_url: String,
    /// Operations server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "OPS_LISTEN_ADDR", default_value = "0.0.0.0:9104")]
    pub ops_listen_addr: SocketAddr,
    /// How long in-flight deliveries may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
    /// Allow `http://` event webhook URLs (development only).
    #[arg(
        long,
        env = "ALLOW_HTTP_WEBHOOK_URLS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_http_webhook_urls: bool,
    /// Comma-separated CIDRs that event webhooks may reach although they are private,
    /// loopback or link-local (e.g. `10.20.0.0/16`). Empty: none.
    #[arg(long, env = "SSRF_ALLOW_CIDRS", default_value = "")]
    pub ssrf_allow_cidrs: String,
    /// Availability events older than this (seconds since they happened) are dropped instead
    /// of delivered late.
    #[arg(long, env = "FLOW_EVENT_MAX_AGE_SECONDS", default_value_t = 600)]
    pub flow_event_max_age_seconds: u64,
    /// Whole-request timeout of one delivery attempt, in milliseconds.
    #[arg(long, env = "HTTP_TIMEOUT_MS", default_value_t = 5000)]
    pub http_timeout_ms: u64,
    /// TCP/TLS connect timeout of one delivery attempt, in milliseconds.
    #[arg(long, env = "HTTP_CONNECT_TIMEOUT_MS", default_value_t = 2000)]
    pub http_connect_timeout_ms: u64,
    /// Pause before each retry (`ms`, `s`, `m`, `h`): one entry per retry, so attempts =
    /// entries + 1; then the message goes to the dead-letter queue.
    #[arg(
        long,
        env = "RETRY_SCHEDULE",
        default_value = "1s,5s,30s,2m,5m,15m,30m,1h"
    )]
    pub retry_schedule: String,
    /// The delay-tier queues (one queue per entry, each with that message TTL). A pause is
    /// composed from these tiers, so keep the smallest one small.
    #[arg(long, env = "RETRY_DELAY_TIERS", default_value = "1s,5s,30s,2m,10m,1h")]
    pub retry_delay_tiers: String,
    /// Random spread applied to each pause, in percent (20 = ±20 %).
    #[arg(long, env = "RETRY_JITTER_PERCENT", default_value_t = 20)]
    pub retry_jitter_percent: u8,
    /// Upper bound for a receiver's `Retry-After`, in seconds.
    #[arg(long, env = "RETRY_AFTER_MAX_SECONDS", default_value_t = 900)]
    pub retry_after_max_seconds: u64,
    /// Deliveries handled at the same time per work queue (one consumer each).
    #[arg(long, env = "DELIVERY_CONCURRENCY", default_value_t = 8)]
    pub delivery_concurrency: u16,
}

/// The dev default token; using it logs a warning at start.
pub const DEV_CONFIG_TOKEN: &str = "dev-flow-callback-token";

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Retry(#[from] RetryPolicyError),
    #[error(transparent)]
    Ssrf(#[from] SsrfPolicyError),
    #[error("MESSAGEBIRD_API_BASE_URL is not a URL: {0}")]
    ApiBase(String),
    #[error("DELIVERY_CONCURRENCY must be at least 1")]
    Concurrency,
}

impl Settings {
    /// Defaults only (no flags, no environment), for tests that then override fields.
    pub fn defaults() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_prefix: String::new(),
            amqp_confirm_timeout_ms: 5000,
            config_grpc_url: "http://127.0.0.1:50051".into(),
            config_service_token: DEV_CONFIG_TOKEN.into(),
            config_timeout_ms: 3000,
            shop_cache_ttl_seconds: 300,
            messagebird_api_base_url: "https://conversations.messagebird.com".into(),
            ops_listen_addr: SocketAddr::from(([0, 0, 0, 0], 9104)),
            shutdown_grace_seconds: 20,
            allow_http_webhook_urls: false,
            ssrf_allow_cidrs: String::new(),
            flow_event_max_age_seconds: 600,
            http_timeout_ms: 5000,
            http_connect_timeout_ms: 2000,
            retry_schedule: "1s,5s,30s,2m,5m,15m,30m,1h".into(),
            retry_delay_tiers: "1s,5s,30s,2m,10m,1h".into(),
            retry_jitter_percent: 20,
            retry_after_max_seconds: 900,
            delivery_concurrency: 8,
        }
    }

    pub fn retry_policy(&self) -> Result<RetryPolicy, SettingsError> {
        Ok(RetryPolicy::new(
            parse_duration_list(&self.retry_schedule)?,
            parse_duration_list(&self.retry_delay_tiers)?,
            f64::from(self.retry_jitter_percent.min(100)) / 100.0,
            Duration::from_secs(self.retry_after_max_seconds),
        )?)
    }

    pub fn ssrf_policy(&self) -> Result<Arc<SsrfPolicy>, SettingsError> {
        Ok(Arc::new(SsrfPolicy::parse(
            self.allow_http_webhook_urls,
            &self.ssrf_allow_cidrs,
        )?))
    }

    pub fn api_base(&self) -> Result<url::Url, SettingsError> {
        url::Url::parse(&self.messagebird_api_base_url)
            .map_err(|e| SettingsError::ApiBase(e.to_string()))
    }

    pub fn flow_event_max_age(&self) -> Duration {
        Duration::from_secs(self.flow_event_max_age_seconds)
    }
}
