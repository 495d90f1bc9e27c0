//! The MessageBird side our services call, as one long-running process for demos and manual
//! runs: the Conversations API (flow-callback's `MESSAGEBIRD_API_BASE_URL`) and a flow webhook
//! receiver (a shop's event webhook URL). Every request is printed as one JSON line.

use std::{net::SocketAddr, time::Duration};

use serde_json::json;

use crate::{conversations_api::ConversationsApi, flow_receiver::FlowReceiver};

/// Flags of `mb-simulator messagebird`.
#[derive(Debug, Clone, clap::Args)]
pub struct SideArgs {
    /// Where the simulated Conversations API listens.
    #[arg(long, env = "MB_API_LISTEN_ADDR", default_value = "127.0.0.1:8091")]
    pub api_listen: SocketAddr,
    /// Where the flow webhook receiver listens.
    #[arg(long, env = "MB_FLOW_LISTEN_ADDR", default_value = "127.0.0.1:8092")]
    pub flow_listen: SocketAddr,
    /// The shop's callback secret, to verify availability events' signatures.
    #[arg(long, env = "MB_CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,
}

/// Serves both until Ctrl-C or SIGTERM.
pub async fn serve(args: SideArgs) -> std::io::Result<()> {
    let api = ConversationsApi::start_on(args.api_listen).await?;
    let receiver = FlowReceiver::start_on(args.flow_listen).await?;
    if let Some(secret) = &args.callback_secret {
        receiver.set_secret(secret);
    }
    println!(
        "{}",
        json!({ "conversations_api": api.base_url(), "flow_webhook_url": receiver.url("demo") })
    );
    let (mut api_seen, mut flow_seen) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        let requests = api.requests();
        for request in requests.iter().skip(api_seen) {
            println!(
                "{}",
                json!({ "api": request.path, "status": request.status, "body": request.body })
            );
        }
        api_seen = requests.len();
        let calls = receiver.calls();
        for call in calls.iter().skip(flow_seen) {
            let signature = match &call.signature {
                None => "unchecked".to_owned(),
                Some(Ok(())) => "valid".to_owned(),
                Some(Err(error)) => format!("invalid: {error}"),
            };
            println!(
                "{}",
                json!({ "flow": call.path, "signature": signature, "event": call.json })
            );
        }
        flow_seen = calls.len();
    }
}
