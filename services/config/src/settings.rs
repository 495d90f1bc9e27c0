//! Command line and environment: every setting has an environment variable and a default that
//! works against the local infrastructure, so `config --help` is the reference.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use clap::{Args, Parser, Subcommand};

/// `config`: the ShopCtrl Messaging config service.
#[derive(Debug, Parser)]
#[command(
    name = "config",
    version,
    about = "ShopCtrl Messaging config service: shop settings, roles, Chat permissions and slots over gRPC",
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
    /// Re-encrypt every stored secret with the active key (the first of
    /// SECRETS_ENCRYPTION_KEYS), so an old key can then be removed.
    ReencryptSecrets,
}

/// Every setting of the config service.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// PostgreSQL database; the service uses its own schema `config` in it.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/shopctrl_messaging?sslmode=disable"
    )]
    pub database_url: Redacted,

    /// Maximum number of PostgreSQL connections of this replica.
    #[arg(
        long,
        env = "DATABASE_MAX_CONNECTIONS",
        global = true,
        default_value_t = 10
    )]
    pub database_max_connections: u32,

    /// RabbitMQ broker for config-changed events.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        global = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: Redacted,

    /// Prefix of every exchange and queue name (tests and shared brokers).
    #[arg(long, env = "AMQP_PREFIX", global = true, default_value = "")]
    pub amqp_prefix: String,

    /// Where the gRPC API listens.
    #[arg(
        long,
        env = "GRPC_LISTEN_ADDR",
        global = true,
        default_value = "0.0.0.0:50051"
    )]
    pub grpc_listen_addr: SocketAddr,

    /// Where /healthz, /readyz and /metrics listen.
    #[arg(
        long,
        env = "OPS_LISTEN_ADDR",
        global = true,
        default_value = "0.0.0.0:9101"
    )]
    pub ops_listen_addr: SocketAddr,

    /// Service tokens, `caller=token,...` with callers shopctrl, ingress, routing,
    /// flow-callback. Unset: development tokens (dev-<caller>-token) and a warning.
    #[arg(long, env = "AUTH_TOKENS", hide_env_values = true, global = true)]
    pub auth_tokens: Option<Redacted>,

    /// Secret encryption keys, `keyid:base64(32 bytes),...`; the first encrypts, all decrypt.
    /// Unset (and no file): a public development key and a loud warning.
    #[arg(
        long,
        env = "SECRETS_ENCRYPTION_KEYS",
        hide_env_values = true,
        global = true
    )]
    pub secrets_encryption_keys: Option<Redacted>,

    /// A file holding the value of SECRETS_ENCRYPTION_KEYS (a mounted Kubernetes Secret);
    /// used when SECRETS_ENCRYPTION_KEYS is unset.
    #[arg(long, env = "SECRETS_ENCRYPTION_KEYS_FILE", global = true)]
    pub secrets_encryption_keys_file: Option<PathBuf>,

    /// Accept http:// Event webhook URLs (development only; https is required otherwise).
    #[arg(
        long,
        env = "ALLOW_HTTP_WEBHOOK_URLS",
        global = true,
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub allow_http_webhook_urls: bool,

    /// Networks (CIDRs or addresses, comma-separated) an Event webhook URL may point at even
    /// though they are private or loopback, e.g. `127.0.0.0/8` for a local stack. Empty in
    /// production. flow-callback reads the same variable.
    #[arg(long, env = "SSRF_ALLOW_CIDRS", global = true, default_value = "")]
    pub ssrf_allow_cidrs: String,

    /// How long a shutdown may take before in-flight work is abandoned.
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_SECONDS",
        global = true,
        default_value_t = 20
    )]
    pub shutdown_grace_seconds: u64,
}

impl Settings {
    /// The settings as they would be with no flags and no environment (for tests, which then
    /// point them at their own database and broker prefix).
    pub fn defaults() -> Self {
        // Parsing an empty command line cannot fail: every field has a default or is optional.
        match Cli::try_parse_from(["config"]) {
            Ok(cli) => cli.settings,
            Err(error) => unreachable!("defaults must parse: {error}"),
        }
    }
}

/// A string that never shows up in logs or `Debug` output (URLs with passwords, tokens, keys).
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
        f.write_str("\"<redacted>\"")
    }
}

impl FromStr for Redacted {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_against_localhost_and_hide_secrets() {
        let settings = Settings::defaults();
        assert_eq!(settings.grpc_listen_addr.port(), 50051);
        assert_eq!(settings.ops_listen_addr.port(), 9101);
        assert!(!settings.allow_http_webhook_urls);
        let shown = format!("{settings:?}");
        assert!(!shown.contains("guest:guest"), "{shown}");
    }

    #[test]
    fn settings_are_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from(["config", "migrate", "--amqp-prefix", "x."])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.command, Some(Command::Migrate));
        assert_eq!(cli.settings.amqp_prefix, "x.");
    }
}
