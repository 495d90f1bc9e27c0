//! The `flow-callback` binary: settings, telemetry, then the service until SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shopctrl_flow_callback::{App, Cli, Command, Deps, settings::DEV_CONFIG_TOKEN};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = shopctrl_telemetry::init("flow-callback").context("telemetry")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let settings = cli.settings;
            if settings.config_service_token == DEV_CONFIG_TOKEN {
                tracing::warn!("CONFIG_SERVICE_TOKEN is the development default; set a real token");
            }
            if settings.allow_http_webhook_urls {
                tracing::warn!(
                    "ALLOW_HTTP_WEBHOOK_URLS is on: event webhooks may use plain http (development only)"
                );
            }
            let shutdown = shopctrl_runtime::shutdown_on_signal();
            let app = App::build(settings, Deps::default())
                .await
                .context("starting flow-callback")?;
            app.run(shutdown).await.context("running flow-callback")?;
        }
    }
    // Give the exporter a moment to flush the last spans.
    tokio::time::sleep(Duration::from_millis(50)).await;
    telemetry.shutdown();
    Ok(())
}
