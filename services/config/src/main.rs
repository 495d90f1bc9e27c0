//! `config`: serve (default), migrate, or re-encrypt secrets. Everything else is in the library.

use clap::Parser;
use shopctrl_config::{App, Cli, Command, connect_and_migrate, reencrypt_secrets};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = shopctrl_telemetry::init("config")?;
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let shutdown = shopctrl_runtime::shutdown_on_signal();
            match App::build(cli.settings).await {
                Ok(app) => app.run(shutdown).await,
                Err(error) => Err(error),
            }
        }
        Command::Migrate => connect_and_migrate(&cli.settings).await.map(|pool| {
            tracing::info!("config schema migrated");
            drop(pool);
        }),
        Command::ReencryptSecrets => reencrypt_secrets(&cli.settings).await.map(|rewritten| {
            tracing::info!(rewritten, "secrets re-encrypted with the active key");
        }),
    };
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "config service failed");
    }
    telemetry.shutdown();
    result
}
