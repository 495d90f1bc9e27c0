//! `routing`: serve (default) or migrate.

use clap::Parser;
use shopctrl_routing::{App, Cli, Command, Overrides, migrate};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = shopctrl_telemetry::init("routing")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            migrate(&cli.settings).await?;
            tracing::info!("migrations applied");
        }
        Command::Serve => {
            migrate(&cli.settings).await?;
            let shutdown = shopctrl_runtime::shutdown_on_signal();
            let app = App::build(cli.settings, Overrides::default()).await?;
            tracing::info!(grpc = %app.grpc_addr()?, ops = %app.ops_addr()?, "routing started");
            app.run(shutdown).await?;
        }
    }
    Ok(())
}
