//! `mb-simulator`: plays MessageBird against a local stack (signed webhooks) and prepares
//! pre-signed request sets for load tests.
use clap::{Parser, Subcommand};
use shopctrl_e2e::{
    load::{LoadSpec, write_load_files},
    webhooks::{Channel, Content, Conversation, sign_webhook, sign_webhook_legacy, webhook_path},
};

#[derive(Parser)]
#[command(
    name = "mb-simulator",
    about = "MessageBird simulator: signed webhooks and load request sets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Seed shops and employees, play a scenario against a running stack and show it live
    /// (what `make run` runs).
    Demo(shopctrl_e2e::demo::DemoArgs),
    /// The end-to-end benchmark's client against a running stack (what `make bench` runs).
    Bench(shopctrl_e2e::bench::BenchArgs),
    /// Send one signed webhook (an inbound message) to ingress.
    Send {
        /// Where ingress listens.
        #[arg(long, env = "INGRESS_URL", default_value = "http://127.0.0.1:8080")]
        ingress_url: String,
        /// The public base URL ingress verifies against (its PUBLIC_BASE_URL).
        #[arg(long, env = "PUBLIC_BASE_URL", default_value = "http://127.0.0.1:8080")]
        public_base: String,
        #[arg(long)]
        shop: String,
        #[arg(long, env = "MB_SIGNING_KEY")]
        signing_key: String,
        #[arg(long, default_value = "Hello, can someone help me?")]
        text: String,
        #[arg(long, default_value = "31612345678")]
        msisdn: String,
        /// `whatsapp` or `widget`.
        #[arg(long, default_value = "whatsapp")]
        channel: String,
        /// Reuse this MessageBird conversation id (default: a new conversation).
        #[arg(long)]
        conversation: Option<String>,
        /// Sign with the deprecated legacy scheme instead of the JWT.
        #[arg(long)]
        legacy: bool,
    },
    /// Serve the MessageBird side our services call: the Conversations API and a flow
    /// webhook receiver, printing every request as a JSON line.
    Messagebird(shopctrl_e2e::messagebird_side::SideArgs),
    /// Write pre-signed requests for wrk (bodies.txt, tokens.txt).
    LoadFiles {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        public_base: String,
        #[arg(long)]
        shop: String,
        #[arg(long)]
        signing_key: String,
        #[arg(long, default_value_t = 300_000)]
        count: usize,
        #[arg(long, default_value_t = 256)]
        bodies: usize,
        #[arg(long, default_value_t = 1800)]
        lifetime_seconds: i64,
        #[arg(long)]
        out_dir: std::path::PathBuf,
    },
    /// Send pre-signed requests (from `load-files`) at a fixed rate, open loop, and print the
    /// latencies as JSON.
    Rate {
        /// The webhook URL, e.g. http://127.0.0.1:8080/webhooks/messagebird/<shop>.
        #[arg(long)]
        url: String,
        /// A directory `load-files` wrote.
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 5000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 1000)]
        max_in_flight: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => shopctrl_e2e::demo::run(args).await?,
        Command::Bench(args) => shopctrl_e2e::bench::run(args).await?,
        Command::Rate {
            url,
            dir,
            rate,
            seconds,
            max_in_flight,
        } => {
            let report =
                shopctrl_e2e::load::fixed_rate(&url, &dir, rate, seconds, max_in_flight).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Send {
            ingress_url,
            public_base,
            shop,
            signing_key,
            text,
            msisdn,
            channel,
            conversation,
            legacy,
        } => {
            let channel = if channel == "widget" {
                Channel::WebWidget
            } else {
                Channel::WhatsApp
            };
            let mut conv = Conversation::new(channel, &msisdn);
            if let Some(id) = conversation {
                conv.conversation_id = id;
            }
            let body = conv
                .inbound(
                    &uuid::Uuid::new_v4().simple().to_string(),
                    &Content::Text(text),
                )
                .to_string();
            let path = webhook_path(&shop);
            let signed = if legacy {
                sign_webhook_legacy(
                    &public_base,
                    &path,
                    body.as_bytes(),
                    &signing_key,
                    chrono::Utc::now().timestamp(),
                )
            } else {
                sign_webhook(&public_base, &path, body.as_bytes(), &signing_key)
            };
            let mut request = reqwest::Client::new()
                .post(format!(
                    "{}{}",
                    ingress_url.trim_end_matches('/'),
                    signed.path_and_query
                ))
                .body(signed.body);
            for (k, v) in &signed.headers {
                request = request.header(k, v);
            }
            let response = request.send().await?;
            println!("{} {}", response.status(), response.text().await?);
        }
        Command::Messagebird(args) => shopctrl_e2e::messagebird_side::serve(args).await?,
        Command::LoadFiles {
            public_base,
            shop,
            signing_key,
            count,
            bodies,
            lifetime_seconds,
            out_dir,
        } => {
            write_load_files(
                &LoadSpec {
                    public_base,
                    shop_id: shop,
                    signing_key,
                    count,
                    bodies,
                    lifetime_seconds,
                },
                &out_dir,
            )?;
            println!(
                "wrote {count} signed requests over {bodies} bodies to {}",
                out_dir.display()
            );
        }
    }
    Ok(())
}
