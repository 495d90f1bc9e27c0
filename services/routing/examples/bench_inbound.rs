//! Inbound throughput and latency of routing, against the real PostgreSQL and RabbitMQ (run by
//! `deploy/bench-routing.sh`, release build). Three measurements in one run:
//!
//! 1. ceiling: a bare consumer that only acks (`multiple` every 64) drains the same number of
//!    the same events from a quorum queue: the broker's share of the work, as a reference;
//! 2. drain: N realistic events pre-filled into the shard queues, then routing starts; events
//!    per second until the last one is committed;
//! 3. latency: events published at a stated rate while routing runs; for each event, the time
//!    from its `received_at` (set when published, as ingress does) to routing's commit.
//!
//! Each run uses its own database and AMQP prefix (removed afterwards).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use futures::{StreamExt, future::BoxFuture, future::join_all};
use prost::Message as _;
use shopctrl_amqp::{Names, Outgoing, Publisher, QueueSpec, declare_queue, lapin};
use shopctrl_domain::{ShardCount, shard_routing_key};
use shopctrl_proto::v1::{
    Channel, Direction, EmployeeAccess, EventMeta, InboundContact, InboundMessage,
    InboundWebhookEvent, Role, RoutingEmployee, RoutingShop,
};
use shopctrl_routing::{
    App, Overrides, Settings,
    access::{ConfigSource, ConfigSourceError},
    consumer::{CommitHook, Committed},
    migrate,
    settings::Redacted,
};
use shopctrl_testkit::{TestAmqp, TestDatabase, TestRedis};
use tokio_util::sync::CancellationToken;

const SHOP: &str = "bench-shop";

struct StaticConfig;

impl ConfigSource for StaticConfig {
    fn routing_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RoutingShop>, ConfigSourceError>> {
        Box::pin(async move {
            Ok(Some(RoutingShop {
                shop_id: shop_id.to_owned(),
                enabled: true,
                assign_on_first_message: true,
                new_conversation_on_closed: false,
                conversation_slots: 5,
                employees: (0..20)
                    .map(|i| RoutingEmployee {
                        employee_id: format!("agent-{i}"),
                        display_name: format!("Agent {i}"),
                        role: Role::ShopEmployee as i32,
                        chat_permission: true,
                    })
                    .collect(),
                version: 1,
            }))
        })
    }
    fn employee_access<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: &'a str,
    ) -> BoxFuture<'a, Result<EmployeeAccess, ConfigSourceError>> {
        Box::pin(async move {
            Ok(EmployeeAccess {
                shop_id: shop_id.to_owned(),
                employee_id: employee_id.to_owned(),
                role: Role::ShopEmployee as i32,
                chat_permission: true,
            })
        })
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ts(at: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Event `i` of a realistic mix over 2,000 customers: mostly customer texts, some bot
/// replies, some delivery updates of those, a few images (unsupported, they notify).
fn event(run: &str, i: u64) -> InboundWebhookEvent {
    let customer = i % 2000;
    let round = i / 2000;
    let conversation = format!("{run}-conv-{customer:05}");
    let (direction, kind, id, status, webhook) = match i % 20 {
        0..=13 => (
            Direction::Received,
            "text",
            format!("{run}-in-{i}"),
            "received",
            "message.created",
        ),
        14..=16 => (
            Direction::Sent,
            "text",
            format!("{run}-bot-{customer}-{round}"),
            "sent",
            "message.created",
        ),
        17 | 18 => (
            Direction::Sent,
            "text",
            format!("{run}-bot-{customer}-{round}"),
            "delivered",
            "message.updated",
        ),
        _ => (
            Direction::Received,
            "image",
            format!("{run}-img-{i}"),
            "received",
            "message.created",
        ),
    };
    let text = if kind == "text" {
        format!("Hello, this is message {i} about order {}", 1000 + customer)
    } else {
        String::new()
    };
    let now = Utc::now();
    InboundWebhookEvent {
        meta: Some(EventMeta {
            event_id: uuid::Uuid::new_v4().to_string(),
            occurred_at: Some(ts(now)),
            producer: "bench".into(),
        }),
        shop_id: SHOP.into(),
        webhook_type: webhook.into(),
        messagebird_conversation_id: conversation,
        contact: Some(InboundContact {
            messagebird_contact_id: format!("contact-{customer}"),
            msisdn: format!("316{customer:08}"),
            display_name: format!("Customer {customer}"),
        }),
        message: Some(InboundMessage {
            messagebird_message_id: id,
            direction: direction as i32,
            channel: Channel::Whatsapp as i32,
            platform: "whatsapp".into(),
            channel_id: "bench-channel".into(),
            r#type: kind.into(),
            text: text.clone(),
            supported: kind == "text",
            content_json: serde_json::json!({ "text": text }).to_string(),
            raw_status: status.into(),
            status: shopctrl_domain::message_status_from_messagebird(status) as i32,
            created_at: Some(ts(now)),
            updated_at: Some(ts(now)),
            from: format!("316{customer:08}"),
            to: "bench-channel".into(),
        }),
        conversation_status: "active".into(),
        signature_scheme: "jwt".into(),
        received_at: Some(ts(now)),
        raw_body: vec![b'x'; 600],
    }
}

async fn publish_all(
    publisher: &Publisher,
    names: &Names,
    shards: ShardCount,
    events: impl Iterator<Item = InboundWebhookEvent>,
) {
    let exchange = names.inbound_exchange();
    let encoded: Vec<(String, String, Vec<u8>)> = events
        .map(|e| {
            (
                shard_routing_key(&e.shop_id, &e.messagebird_conversation_id, shards),
                e.meta.clone().unwrap_or_default().event_id,
                e.encode_to_vec(),
            )
        })
        .collect();
    for chunk in encoded.chunks(256) {
        let results = join_all(chunk.iter().map(|(key, id, payload)| {
            publisher.publish(Outgoing {
                exchange: &exchange,
                routing_key: key,
                message_type: "shopctrl.messaging.v1.InboundWebhookEvent",
                message_id: id,
                payload,
                headers: &[],
                mandatory: true,
            })
        }))
        .await;
        for r in results {
            r.expect("publish");
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    shopctrl_testkit::init_logging();
    let n = arg("--events", 20_000);
    let rate = arg("--rate", 2_000);
    let seconds = arg("--seconds", 10);
    let shards = arg("--shards", 4) as u32;
    let batch = arg("--batch-size", 128) as usize;
    let shard_count = ShardCount::new(shards).unwrap();
    let db = TestDatabase::create().await;
    let amqp = TestAmqp::create().await;
    // The slot keys under a prefix of their own, deleted at the end like the database.
    let redis = TestRedis::create().await;
    let names = Names::new(amqp.prefix());
    for name in [
        names.inbound_exchange(),
        names.dead_letter_exchange(),
        names.outbound_exchange(),
        names.config_exchange(),
        names.notify_exchange(),
    ] {
        amqp.track_exchange(name);
    }
    for s in 0..shard_count.get() {
        amqp.track_queue(names.inbound_shard_queue(s));
    }
    for q in ["inbound", "outbound-result", "config-routing"] {
        amqp.track_queue(names.dead_letter_queue(q));
    }
    for q in [
        "messaging.outbound.result",
        "messaging.config.routing",
        "bench.ceiling",
    ] {
        amqp.track_queue(names.custom(q));
    }
    let publisher = Publisher::connect(amqp.url(), "bench publisher", Duration::from_secs(30))
        .await
        .unwrap();

    // 1. The ceiling: consume-and-ack only, same events, one quorum queue.
    let conn = lapin::Connection::connect(amqp.url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let ceiling_queue = names.custom("bench.ceiling");
    declare_queue(&channel, &QueueSpec::quorum(ceiling_queue.clone()))
        .await
        .unwrap();
    {
        let events: Vec<Vec<u8>> = (0..n)
            .map(|i| event("ceiling", i).encode_to_vec())
            .collect();
        for chunk in events.chunks(256) {
            let results = join_all(chunk.iter().map(|payload| {
                publisher.publish(Outgoing {
                    exchange: "",
                    routing_key: &ceiling_queue,
                    message_type: "shopctrl.messaging.v1.InboundWebhookEvent",
                    message_id: "x",
                    payload,
                    headers: &[],
                    mandatory: true,
                })
            }))
            .await;
            for r in results {
                r.expect("publish");
            }
        }
    }
    channel.basic_qos(512, Default::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            ceiling_queue.as_str().into(),
            "ceiling".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    let mut seen = 0u64;
    while seen < n {
        let delivery = consumer.next().await.unwrap().unwrap();
        seen += 1;
        if seen.is_multiple_of(64) || seen == n {
            delivery
                .ack(lapin::options::BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let ceiling = n as f64 / start.elapsed().as_secs_f64();
    let _ = conn.close(200, "ok".into()).await;

    // 2. Drain: pre-fill, then start routing.
    let mut settings = Settings::defaults();
    settings.database_url = Redacted::new(db.url());
    settings.database_max_connections = shards + shopctrl_routing::app::RESERVED_CONNECTIONS;
    settings.amqp_url = Redacted::new(amqp.url());
    settings.amqp_prefix = amqp.prefix().to_owned();
    settings.routing_shards = shards;
    settings.routing_batch_size = batch;
    settings.slots.redis_url = redis.url().to_owned();
    settings.slots.slots_key_prefix = redis.prefix().to_owned();
    settings.grpc_listen_addr = "127.0.0.1:0".parse().unwrap();
    settings.ops_listen_addr = "127.0.0.1:0".parse().unwrap();
    migrate(&settings).await.unwrap();
    let committed = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let hook: CommitHook = {
        let committed = committed.clone();
        let latencies = latencies.clone();
        Arc::new(move |batch: &Committed| {
            let now = Utc::now();
            committed.fetch_add(batch.received_at.len(), Ordering::SeqCst);
            let mut l = latencies.lock().unwrap();
            for at in batch.received_at.iter().flatten() {
                l.push((now - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        })
    };
    let app = App::build(
        settings,
        Overrides {
            config_source: Some(Arc::new(StaticConfig)),
            after_commit: Some(hook),
        },
    )
    .await
    .unwrap();
    let pool = app.pool();
    let fill_start = Instant::now();
    publish_all(
        &publisher,
        &names,
        shard_count,
        (0..n).map(|i| event("drain", i)),
    )
    .await;
    let fill_rate = n as f64 / fill_start.elapsed().as_secs_f64();
    let stop = CancellationToken::new();
    let wal_before = wal_lsn(&pool).await;
    let cpu_before = CpuTicks::now();
    let start = Instant::now();
    let task = tokio::spawn(app.run(stop.clone()));
    while (committed.load(Ordering::SeqCst) as u64) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_seconds = start.elapsed().as_secs_f64();
    let cpu = CpuTicks::now().since(&cpu_before);
    let wal_bytes = wal_lsn(&pool).await - wal_before;
    let drain = n as f64 / drain_seconds;

    // 3. Latency at a stated rate.
    latencies.lock().unwrap().clear();
    let before = committed.load(Ordering::SeqCst) as u64;
    let total = rate * seconds;
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    let mut sent = 0u64;
    let paced_cpu_before = CpuTicks::now();
    let paced_start = Instant::now();
    while sent < total {
        interval.tick().await;
        let count = per_tick.min(total - sent);
        let batch: Vec<_> = (sent..sent + count).map(|i| event("paced", i)).collect();
        publish_all(&publisher, &names, shard_count, batch.into_iter()).await;
        sent += count;
    }
    let offered = total as f64 / paced_start.elapsed().as_secs_f64();
    while (committed.load(Ordering::SeqCst) as u64) < before + total {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let paced_cpu = CpuTicks::now().since(&paced_cpu_before);
    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (messages, conversations): (i64, i64) = sqlx::query_as(
        "select (select count(*) from messages), (select count(*) from conversations)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    stop.cancel();
    let _ = task.await;
    // Backends report their table statistics when they end: close the pool, then read them.
    pool.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = table_writes(&db).await;

    println!("routing inbound benchmark: {n} events, {shards} shards, batch {batch}");
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| ceiling: bare consume + ack(multiple/64), one quorum queue | {ceiling:.0} events/s |"
    );
    println!(
        "| fill: confirmed publish of the drain events (window 256) | {fill_rate:.0} events/s |"
    );
    println!(
        "| drain: routing applies and commits {n} queued events | {drain:.0} events/s ({drain_seconds:.1} s), {:.0} % of ceiling |",
        100.0 * drain / ceiling
    );
    println!(
        "| latency at {rate}/s offered ({offered:.0}/s achieved, {total} events) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        percentile(&l, 0.50),
        percentile(&l, 0.99),
        percentile(&l, 1.0)
    );
    println!("| stored | {messages} messages, {conversations} conversations |");
    let per_event = |ticks: u64| ticks as f64 / cpu.hz * 1e6 / n as f64;
    println!(
        "| drain: CPU per event (routing process / PostgreSQL / RabbitMQ / Redis) | {:.0} / {:.0} / {:.0} / {:.0} us |",
        per_event(cpu.own),
        per_event(cpu.postgres),
        per_event(cpu.rabbitmq),
        per_event(cpu.redis)
    );
    let paced_per_event = |ticks: u64| ticks as f64 / paced_cpu.hz * 1e6 / total as f64;
    println!(
        "| latency phase: CPU per event (routing process, publisher included / PostgreSQL / RabbitMQ / Redis) | {:.0} / {:.0} / {:.0} / {:.0} us |",
        paced_per_event(paced_cpu.own),
        paced_per_event(paced_cpu.postgres),
        paced_per_event(paced_cpu.rabbitmq),
        paced_per_event(paced_cpu.redis)
    );
    println!(
        "| drain: WAL per event | {:.0} bytes |",
        wal_bytes as f64 / n as f64
    );
    let all = (n + total) as f64;
    let summary: Vec<String> = writes
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(table, w)| format!("{table} {:.2}", *w as f64 / all))
        .collect();
    println!(
        "| row writes per event, whole run (inserts + updates + deletes) | {:.2}: {} |",
        writes.iter().map(|(_, w)| *w).sum::<i64>() as f64 / all,
        summary.join(", ")
    );
}

/// CPU time (clock ticks) of this process and of the servers it drives, read from /proc.
struct CpuTicks {
    hz: f64,
    own: u64,
    postgres: u64,
    rabbitmq: u64,
    redis: u64,
}

impl CpuTicks {
    fn now() -> Self {
        let mut ticks = Self {
            hz: 100.0,
            own: stat_ticks("/proc/self/stat").map_or(0, |(_, t)| t),
            postgres: 0,
            rabbitmq: 0,
            redis: 0,
        };
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some((comm, t)) = stat_ticks(&format!("{}/stat", entry.path().display()))
                else {
                    continue;
                };
                match comm.as_str() {
                    "postgres" => ticks.postgres += t,
                    "beam.smp" => ticks.rabbitmq += t,
                    "redis-server" => ticks.redis += t,
                    _ => {}
                }
            }
        }
        ticks
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            hz: self.hz,
            own: self.own.saturating_sub(before.own),
            postgres: self.postgres.saturating_sub(before.postgres),
            rabbitmq: self.rabbitmq.saturating_sub(before.rabbitmq),
            redis: self.redis.saturating_sub(before.redis),
        }
    }
}

/// (command name, user + system ticks) of one /proc/<pid>/stat.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split(' ').collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

async fn wal_lsn(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rows inserted, updated and deleted per table of the run's database.
async fn table_writes(db: &TestDatabase) -> Vec<(String, i64)> {
    let pool = db.pool().await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select relname::text, (n_tup_ins + n_tup_upd + n_tup_del)::bigint
         from pg_stat_user_tables order by 2 desc",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}
