//! `ingress`: see the library docs; `ingress --help` lists every setting.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = shopctrl_ingress::Cli::parse();
    let telemetry = shopctrl_telemetry::init("ingress")?;
    match cli.command.unwrap_or(shopctrl_ingress::Command::Serve) {
        shopctrl_ingress::Command::Serve => {
            let shutdown = shopctrl_runtime::shutdown_on_signal();
            let app = shopctrl_ingress::App::build(cli.settings).await?;
            app.run(shutdown).await?;
        }
    }
    telemetry.shutdown();
    Ok(())
}
