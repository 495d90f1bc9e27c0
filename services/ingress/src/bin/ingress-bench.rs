//! `ingress-bench`: the helpers of `deploy/bench-ingress.sh`. A fake config service (so the
//! benchmark needs no database), pre-signed request files for wrk, the two reference points
//! measured in the same run (a minimal HTTP server that neither verifies nor publishes, and a
//! bare confirmed publisher with the same number of messages in flight), the broker's own
//! ceiling in the reference setup (a sliding window of confirms, no HTTP, no protobuf), and the
//! bench topology.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lapin::{
    ExchangeKind,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use prost::Message as _;
use shopctrl_amqp::{Names, Outgoing, Publisher, declare_exchange};
use shopctrl_ingress::{fake_config::FakeConfig, payload::parse_webhook};
use shopctrl_proto::v1::IngressShop;
use std::io::BufRead;

#[derive(Parser)]
#[command(name = "ingress-bench", about = "Helpers of deploy/bench-ingress.sh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Where the benchmark's broker objects are: the broker, and the prefix of their names.
#[derive(clap::Args)]
struct Broker {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    #[arg(long)]
    prefix: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve ConfigInternalService.GetIngressShop for one shop until SIGTERM.
    FakeConfig {
        #[arg(long, default_value = "127.0.0.1:50151")]
        listen: SocketAddr,
        #[arg(long, default_value = "bench-ingress-token")]
        token: String,
        #[arg(long, default_value = "bench-shop")]
        shop: String,
        #[arg(long)]
        signing_key: String,
    },
    /// A minimal HTTP server: reads the body, answers 200; no verification, no publishing.
    PlainHttp {
        #[arg(long, default_value = "127.0.0.1:18081")]
        listen: SocketAddr,
    },
    /// Declare the inbound exchange and N bounded quorum shard queues under a prefix.
    Setup {
        #[command(flatten)]
        broker: Broker,
        #[arg(long, default_value_t = 4)]
        shards: u16,
        /// Oldest messages are dropped past this length, so the broker's memory stays bounded.
        #[arg(long, default_value_t = 50_000)]
        max_length: i64,
    },
    /// Delete what `setup` declared.
    Teardown {
        #[command(flatten)]
        broker: Broker,
        #[arg(long, default_value_t = 4)]
        shards: u16,
    },
    /// Publish the same events ingress publishes, with confirms, `concurrency` in flight on
    /// one shared channel (the shared Publisher), for `seconds`; prints JSON.
    BarePublish {
        #[command(flatten)]
        broker: Broker,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        bodies: std::path::PathBuf,
    },
    /// The broker's ceiling in the reference setup: `count` persistent messages of `size`
    /// bytes, no properties, at most `window` unconfirmed on one channel, spread over `queues`
    /// quorum queues that it declares under the prefix (purged first) and deletes. With
    /// `broker_pid`, also the broker's CPU time per message (read from /proc). Prints JSON.
    BrokerCeiling {
        #[command(flatten)]
        broker: Broker,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        queues: usize,
        #[arg(long, default_value_t = 256)]
        window: usize,
        #[arg(long, default_value_t = 50_000)]
        count: usize,
        #[arg(long)]
        broker_pid: Option<u32>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::FakeConfig {
            listen,
            token,
            shop,
            signing_key,
        } => {
            let fake = FakeConfig::new(&token);
            fake.upsert(IngressShop {
                shop_id: shop,
                enabled: true,
                signing_key,
                handover_secret: "bench-handover-secret".into(),
                legacy_signature_enabled: false,
                version: 1,
            });
            let stop = shopctrl_runtime::shutdown_on_signal();
            let addr = fake.serve(listen, stop.clone()).await?;
            println!("fake config on {addr}");
            stop.cancelled().await;
        }
        Cmd::PlainHttp { listen } => {
            let router = axum::Router::new().fallback(|body: axum::body::Bytes| async move {
                std::hint::black_box(body.len());
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    r#"{"status":"accepted"}"#,
                )
            });
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let stop = shopctrl_runtime::shutdown_on_signal();
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await?;
        }
        Cmd::Setup {
            broker: Broker { amqp_url, prefix },
            shards,
            max_length,
        } => {
            let names = Names::new(prefix);
            let conn = shopctrl_amqp::connect(&amqp_url, "ingress-bench-setup").await?;
            let channel = conn.create_channel().await?;
            declare_exchange(&channel, &names.inbound_exchange(), ExchangeKind::Direct).await?;
            for shard in 0..shards {
                let queue = names.inbound_shard_queue(shard);
                let mut args = FieldTable::default();
                args.insert(
                    ShortString::from("x-queue-type"),
                    AMQPValue::LongString("quorum".into()),
                );
                args.insert(
                    ShortString::from("x-max-length"),
                    AMQPValue::LongLongInt(max_length),
                );
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        args,
                    )
                    .await
                    .with_context(|| format!("declaring {queue}"))?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        names.inbound_exchange().as_str().into(),
                        format!("shard.{shard}").as_str().into(),
                        Default::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            let _ = conn.close(200, "ok".into()).await;
        }
        Cmd::Teardown {
            broker: Broker { amqp_url, prefix },
            shards,
        } => {
            let names = Names::new(prefix);
            let conn = shopctrl_amqp::connect(&amqp_url, "ingress-bench-teardown").await?;
            // The shard queues, and the queue `broker-ceiling` left if it was interrupted.
            let queues = (0..shards)
                .map(|shard| names.inbound_shard_queue(shard))
                .chain((0..CEILING_QUEUES_DELETED).map(|i| ceiling_queue(names.prefix(), i)));
            for queue in queues {
                let channel = conn.create_channel().await?;
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            // Every exchange a service declares under the prefix (ingress declares the config
            // exchange it listens on), so a benchmark leaves nothing on the broker.
            for exchange in [
                names.inbound_exchange(),
                names.flow_exchange(),
                names.outbound_exchange(),
                names.notify_exchange(),
                names.config_exchange(),
                names.dead_letter_exchange(),
            ] {
                let channel = conn.create_channel().await?;
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "ok".into()).await;
        }
        Cmd::BarePublish {
            broker: Broker { amqp_url, prefix },
            shards,
            concurrency,
            seconds,
            bodies,
        } => {
            bare_publish(&amqp_url, &prefix, shards, concurrency, seconds, &bodies).await?;
        }
        Cmd::BrokerCeiling {
            broker: Broker { amqp_url, prefix },
            size,
            queues,
            window,
            count,
            broker_pid,
        } => {
            broker_ceiling(
                &amqp_url,
                &prefix,
                Shape {
                    size,
                    // `teardown` deletes only these, should a run be interrupted.
                    queues: queues.clamp(1, CEILING_QUEUES_DELETED),
                    window: window.max(1),
                    count,
                },
                broker_pid,
            )
            .await?;
        }
    }
    Ok(())
}

/// How many of `broker-ceiling`'s queues `teardown` deletes (more are never used here).
const CEILING_QUEUES_DELETED: usize = 8;

fn ceiling_queue(prefix: &str, i: usize) -> String {
    format!("{prefix}ceiling.{i}")
}

/// What `broker-ceiling` publishes.
struct Shape {
    size: usize,
    queues: usize,
    window: usize,
    count: usize,
}

/// User and system CPU time of a process, in clock ticks (USER_HZ, 100 per second on Linux).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .context("unexpected /proc stat format")?
            .parse()?)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Ok(field(11)? + field(12)?)
}

async fn broker_ceiling(
    url: &str,
    prefix: &str,
    shape: Shape,
    broker_pid: Option<u32>,
) -> anyhow::Result<()> {
    use futures::stream::{FuturesUnordered, StreamExt as _};
    use lapin::{
        BasicProperties,
        options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions},
    };

    let conn = shopctrl_amqp::connect(url, "ingress-bench-ceiling").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let names: Vec<String> = (0..shape.queues)
        .map(|i| ceiling_queue(prefix, i))
        .collect();
    for name in &names {
        shopctrl_amqp::declare_queue(&channel, &shopctrl_amqp::QueueSpec::quorum(name.as_str()))
            .await?;
        channel
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }
    let payload = vec![b'x'; shape.size];
    let before = broker_pid.map(cpu_ticks).transpose()?;
    let started = Instant::now();
    let mut unconfirmed = FuturesUnordered::new();
    let mut failed = 0u64;
    for i in 0..shape.count {
        let confirm = channel
            .basic_publish(
                "".into(),
                names[i % names.len()].as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        unconfirmed.push(confirm);
        while unconfirmed.len() >= shape.window {
            if let Some(confirmation) = unconfirmed.next().await
                && !matches!(confirmation, Ok(lapin::Confirmation::Ack(None)))
            {
                failed += 1;
            }
        }
    }
    while let Some(confirmation) = unconfirmed.next().await {
        if !matches!(confirmation, Ok(lapin::Confirmation::Ack(None))) {
            failed += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = broker_pid.map(cpu_ticks).transpose()?;
    for name in &names {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "ok".into()).await;
    let broker_us = before
        .zip(after)
        .map(|(b, a)| (a.saturating_sub(b)) as f64 * 10_000.0 / shape.count.max(1) as f64);
    println!(
        "{}",
        serde_json::json!({
            "size": shape.size,
            "queues": shape.queues,
            "window": shape.window,
            "confirmed": shape.count as u64 - failed,
            "failed": failed,
            "seconds": seconds,
            "rate": (shape.count as u64 - failed) as f64 / seconds,
            "broker_cpu_us_per_message": broker_us,
        })
    );
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

async fn bare_publish(
    url: &str,
    prefix: &str,
    shards: u32,
    concurrency: usize,
    seconds: u64,
    bodies: &std::path::Path,
) -> anyhow::Result<()> {
    let names = Names::new(prefix);
    let shard_count = shopctrl_domain::ShardCount::new(shards)?;
    // The very events ingress would publish for these bodies.
    let mut events = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(bodies)?).lines() {
        let line = line?;
        let parsed = parse_webhook(line.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut event = parsed.event;
        event.shop_id = "bench-shop".into();
        event.raw_body = line.into_bytes();
        let key = shopctrl_domain::shard_routing_key(
            "bench-shop",
            &event.messagebird_conversation_id,
            shard_count,
        );
        events.push((key, parsed.event_id, event.encode_to_vec()));
    }
    let events = Arc::new(events);
    let publisher = Publisher::connect(url, "ingress-bench-bare", Duration::from_secs(10)).await?;
    let exchange: Arc<str> = names.inbound_exchange().into();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (publisher, events, exchange, stop, done, failed) = (
            publisher.clone(),
            events.clone(),
            exchange.clone(),
            stop.clone(),
            done.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut i = worker;
            let headers: Vec<(String, String)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (key, id, payload) = &events[i % events.len()];
                i += concurrency;
                let t = Instant::now();
                let result = publisher
                    .publish(Outgoing {
                        exchange: &exchange,
                        routing_key: key,
                        message_type: "shopctrl.messaging.v1.InboundWebhookEvent",
                        message_id: id,
                        payload,
                        headers: &headers,
                        mandatory: true,
                    })
                    .await;
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await?);
    }
    all.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "confirmed": done.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "seconds": elapsed,
            "rate": done.load(Ordering::Relaxed) as f64 / elapsed,
            "p50_ms": percentile(&all, 50.0),
            "p99_ms": percentile(&all, 99.0),
            "concurrency": concurrency,
        })
    );
    Ok(())
}
