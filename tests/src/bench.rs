//! The end-to-end benchmark's client (`mb-simulator bench`): seeds shops and agents through
//! the config service, then drives a running stack through its public doors only (signed
//! webhooks and flow handovers to ingress) and reads what routing recorded, to report:
//!
//! - latency at a fixed offered rate: webhook sent → assignment recorded in PostgreSQL (for the
//!   webhooks that start a conversation), p50/p99;
//! - the sustained end-to-end rate: as many signed webhooks as the stack takes, counted from the
//!   first send until routing has recorded every accepted one;
//! - handover → flow event delivered to the shop's flow webhook, p50/p99.
//!
//! The workload: `shops` shops, each with every one of `agents` agents (so slots are shared
//! across shops), 1 in 5 webhooks starting a new WhatsApp conversation and the others continuing
//! one of the open ones. Prints one JSON object with every figure.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use futures::{StreamExt, stream};
use shopctrl_proto::v1::{self as pb, config_service_client::ConfigServiceClient};
use sqlx::Row;

use crate::{
    demo::authed,
    flow_receiver::{FlowReceiver, Handover, call_handover},
    webhooks::{self, Channel, Content, Conversation},
};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub config_grpc: String,
    /// ingress's base URL (also the public base URL webhooks are signed for).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingress: String,
    /// The `shopctrl` caller's service token.
    #[arg(long, default_value = "dev-shopctrl-token")]
    pub token: String,
    /// The database routing records in (its `routing` schema is read).
    #[arg(long)]
    pub database_url: String,
    /// Where the flow webhook receiver listens.
    #[arg(long, default_value = "127.0.0.1:9212")]
    pub flow_listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 20)]
    pub shops: usize,
    #[arg(long, default_value_t = 50)]
    pub agents: usize,
    /// Offered rate of the latency phase (webhooks/s).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Length of each phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Requests in flight in the throughput phase.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Handovers measured (at 50/s).
    #[arg(long, default_value_t = 200)]
    pub handovers: usize,
    /// routing's metrics URL: when given, the latency phase is broken down with routing's
    /// own histogram (ingress received → routing committed).
    #[arg(long)]
    pub routing_metrics: Option<String>,
}

/// The cumulative buckets of one Prometheus histogram: (upper bound, count).
async fn histogram(http: &reqwest::Client, url: &str, name: &str) -> Vec<(f64, f64)> {
    let text = match http.get(url).send().await {
        Ok(response) => response.text().await,
        Err(error) => Err(error),
    };
    let text = match text {
        Ok(text) => text,
        Err(error) => {
            eprintln!("cannot read {url}: {error}; the latency breakdown is left out");
            return Vec::new();
        }
    };
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, rest.trim().parse().ok()?))
        })
        .collect()
}

/// Observations between two scrapes.
fn histogram_count(before: &[(f64, f64)], after: &[(f64, f64)]) -> f64 {
    let last = |h: &[(f64, f64)]| h.last().map_or(0.0, |(_, c)| *c);
    last(after) - last(before)
}

/// The bucket bound (ms) under which a share `p` of the observations between two scrapes fell,
/// as JSON: a number, "over <last bound>" past the last finite bucket, null without data.
fn histogram_quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> serde_json::Value {
    let Some(bound) = histogram_bound(before, after, p) else {
        return serde_json::Value::Null;
    };
    if bound.is_finite() {
        return serde_json::json!(bound * 1000.0);
    }
    let last_finite = after
        .iter()
        .map(|(b, _)| *b)
        .filter(|b| b.is_finite())
        .fold(0.0, f64::max);
    serde_json::json!(format!("over {}", last_finite * 1000.0))
}

fn histogram_bound(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, count - earlier)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    counts
        .iter()
        .find(|(_, c)| *c >= p * total)
        .map(|(bound, _)| *bound)
}

struct Shop {
    id: String,
    signing_key: String,
    handover_secret: String,
}

/// Webhook bodies to send: (shop index, body, the conversation it starts if it starts one).
struct Workload {
    shops: usize,
    open: Vec<(usize, Conversation)>,
    counter: u64,
}

impl Workload {
    fn next(&mut self) -> (usize, Vec<u8>, Option<String>) {
        self.counter += 1;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let content = Content::Text(format!("question {}", self.counter));
        if self.open.is_empty() || self.counter.is_multiple_of(5) {
            let shop = (self.counter as usize) % self.shops;
            let conversation = Conversation::new(
                Channel::WhatsApp,
                &format!("3169{:07}", self.counter % 10_000_000),
            );
            let body = conversation.inbound(&id, &content).to_string().into_bytes();
            let started = conversation.conversation_id.clone();
            self.open.push((shop, conversation));
            (shop, body, Some(started))
        } else {
            let pick = (self.counter as usize * 7919) % self.open.len();
            let (shop, conversation) = &self.open[pick];
            let body = conversation.inbound(&id, &content).to_string().into_bytes();
            (*shop, body, None)
        }
    }
}

async fn send(
    http: &reqwest::Client,
    ingress: &str,
    shop: &Shop,
    body: Vec<u8>,
) -> anyhow::Result<u16> {
    let signed = webhooks::sign_webhook(
        ingress,
        &webhooks::webhook_path(&shop.id),
        &body,
        &shop.signing_key,
    );
    let mut request = http.post(&signed.url).body(signed.body);
    for (name, value) in &signed.headers {
        request = request.header(name, value);
    }
    Ok(request.send().await?.status().as_u16())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let flows = FlowReceiver::start_on(args.flow_listen)
        .await
        .context("starting the flow receiver")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await
        .context("routing's database")?;
    let mut config = ConfigServiceClient::connect(args.config_grpc.clone()).await?;
    let owner = format!("owner-{run_id}");
    let mut shops = Vec::new();
    // The last shop waits for flow handovers (assign_on_first_message off).
    for index in 0..=args.shops {
        let id = format!("bench-{run_id}-{index}");
        let signing_key = format!("bench-signing-key-{run_id}-{index}-0123456789");
        let handovers_only = index == args.shops;
        config
            .upsert_employee_role(authed(
                pb::UpsertEmployeeRoleRequest {
                    shop_id: id.clone(),
                    employee_id: owner.clone(),
                    role: pb::Role::ShopOwnerAdmin as i32,
                    display_name: "Owner".into(),
                },
                &args.token,
                &owner,
            )?)
            .await?;
        config
            .update_shop_settings(authed(
                pb::UpdateShopSettingsRequest {
                    shop_id: id.clone(),
                    expected_version: 0,
                    workspace_id: Some("wsbench".into()),
                    access_key: Some(format!("live_bench_access_key_{run_id}_{index}")),
                    signing_key: Some(signing_key.clone()),
                    assign_on_first_message: Some(!handovers_only),
                    event_webhook_url: Some(flows.url(&format!("flow-{index}"))),
                    whatsapp_template_name: Some("agent_reply".into()),
                    whatsapp_template_namespace: Some("bench_namespace".into()),
                    whatsapp_template_language: Some("en".into()),
                    new_conversation_on_closed: Some(false),
                    conversation_slots: Some(1000),
                    legacy_signature_enabled: Some(false),
                },
                &args.token,
                &owner,
            )?)
            .await?;
        let handover_secret = config
            .rotate_handover_secret(authed(
                pb::RotateSecretRequest {
                    shop_id: id.clone(),
                },
                &args.token,
                &owner,
            )?)
            .await?
            .into_inner()
            .secret;
        // Flow events are signed with it.
        config
            .rotate_callback_secret(authed(
                pb::RotateSecretRequest {
                    shop_id: id.clone(),
                },
                &args.token,
                &owner,
            )?)
            .await?;
        for agent in 0..args.agents {
            let employee_id = format!("agent-{run_id}-{agent}");
            config
                .upsert_employee_role(authed(
                    pb::UpsertEmployeeRoleRequest {
                        shop_id: id.clone(),
                        employee_id: employee_id.clone(),
                        role: pb::Role::ShopEmployee as i32,
                        display_name: format!("Agent {agent}"),
                    },
                    &args.token,
                    &owner,
                )?)
                .await?;
            config
                .set_chat_permission(authed(
                    pb::SetChatPermissionRequest {
                        shop_id: id.clone(),
                        employee_id,
                        chat_permission: true,
                    },
                    &args.token,
                    &owner,
                )?)
                .await?;
        }
        shops.push(Shop {
            id,
            signing_key,
            handover_secret,
        });
    }
    // Let routing apply the config events of the seeding first (every agent a candidate of
    // every shop), so the cold start measures a shop's first conversation, not a backlog of
    // config events. A fixed pause was too short on a slow machine.
    let candidates = (shops.len() * args.agents) as i64;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let applied: i64 = sqlx::query_scalar("select count(*) from routing.slot_candidates")
            .fetch_one(&pool)
            .await?;
        if applied >= candidates {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "routing applied {applied} of {candidates} chat permissions within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every candidate being there is not the end of it: each seeded grant is its own config
    // event, and routing applies the rest of them after the first sync of a shop brought in
    // all of its members. Wait until routing's row writes stand still for 5 s, so the phases
    // below do not share the machine with that backlog.
    let writes = || async {
        sqlx::query_scalar::<_, i64>(
            "select coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint
             from pg_stat_user_tables where schemaname = 'routing'",
        )
        .fetch_one(&pool)
        .await
    };
    let mut last = writes().await?;
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(5) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "routing was still applying the seeding's config events after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = writes().await?;
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    let handover_shop = shops.pop().context("no handover shop")?;
    let shops = Arc::new(shops);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;

    // Cold start, measured on its own: each shop's first conversation, one every 50 ms. It
    // pays for what the stack loads on a shop's first webhook (ingress's signing key, routing's
    // first lookups of the shop), which would otherwise sit in the steady-state percentiles.
    // Routing's slot sync of the shop already happened while the seeding was applied.
    let mut cold_starts = HashMap::new();
    for (index, shop) in shops.iter().enumerate() {
        let conversation = Conversation::new(Channel::WhatsApp, &format!("3167{:07}", index));
        let body = conversation
            .inbound(
                &uuid::Uuid::new_v4().simple().to_string(),
                &Content::Text("first message".into()),
            )
            .to_string()
            .into_bytes();
        let sent = SystemTime::now();
        if matches!(send(&http, &args.ingress, shop, body).await, Ok(200..=299)) {
            cold_starts.insert(conversation.conversation_id.clone(), sent);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cold_assigned = wait_assigned(&pool, &cold_starts, Duration::from_secs(60)).await?;
    let cold = latencies_ms(&cold_starts, &cold_assigned);
    let mut workload = Workload {
        shops: shops.len(),
        open: Vec::new(),
        counter: 0,
    };

    // Phase 1: fixed offered rate; send times of conversation-starting webhooks.
    let started_at: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let total = args.rate as u64 * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let refused = Arc::new(Mutex::new(0u64));
    let answered_in: Arc<Mutex<Vec<f64>>> = Arc::default();
    const COMMIT_HISTOGRAM: &str = "routing_inbound_commit_seconds";
    let commit_before = match &args.routing_metrics {
        Some(url) => histogram(&http, url, COMMIT_HISTOGRAM).await,
        None => Vec::new(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        ticker.tick().await;
        let (shop, body, starts) = workload.next();
        let (http, shops, ingress) = (http.clone(), shops.clone(), args.ingress.clone());
        let (started_at, refused) = (started_at.clone(), refused.clone());
        let answered_in = answered_in.clone();
        tasks.spawn(async move {
            let sent = SystemTime::now();
            let clock = Instant::now();
            match send(&http, &ingress, &shops[shop], body).await {
                Ok(200..=299) => {
                    if let Ok(mut answered) = answered_in.lock() {
                        answered.push(clock.elapsed().as_secs_f64() * 1000.0);
                    }
                    if let (Some(id), Ok(mut map)) = (starts, started_at.lock()) {
                        map.insert(id, sent);
                    }
                }
                _ => {
                    if let Ok(mut n) = refused.lock() {
                        *n += 1;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let starts: HashMap<String, SystemTime> =
        started_at.lock().map(|m| m.clone()).unwrap_or_default();
    let assigned = wait_assigned(&pool, &starts, Duration::from_secs(60)).await?;
    let mut answered_in = answered_in.lock().map(|v| v.clone()).unwrap_or_default();
    // Every accepted webhook of the phase, not only the conversation starts waited for above.
    let mut commit_after = Vec::new();
    if let Some(url) = &args.routing_metrics {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            commit_after = histogram(&http, url, COMMIT_HISTOGRAM).await;
            let counted = histogram_count(&commit_before, &commit_after);
            if counted >= answered_in.len() as f64 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    answered_in.sort_by(f64::total_cmp);
    let latencies = latencies_ms(&starts, &assigned);
    let phase1_refused = refused.lock().map(|n| *n).unwrap_or(0);

    // Phase 2: as fast as the stack takes them, `concurrency` in flight.
    let before: i64 = sqlx::query_scalar("select count(*) from routing.messages")
        .fetch_one(&pool)
        .await?;
    let commit_before_phase2 = match &args.routing_metrics {
        Some(url) => histogram(&http, url, COMMIT_HISTOGRAM).await,
        None => Vec::new(),
    };
    let bodies: Vec<(usize, Vec<u8>)> = (0..(args.seconds as usize * 15_000))
        .map(|_| {
            let (shop, body, _) = workload.next();
            (shop, body)
        })
        .collect();
    let first_send = Instant::now();
    let deadline = first_send + Duration::from_secs(args.seconds);
    let accepted = stream::iter(bodies)
        .take_while(|_| futures::future::ready(Instant::now() < deadline))
        .map(|(shop, body)| {
            let (http, shops, ingress) = (http.clone(), shops.clone(), args.ingress.clone());
            async move {
                matches!(
                    send(&http, &ingress, &shops[shop], body).await,
                    Ok(200..=299)
                )
            }
        })
        .buffer_unordered(args.concurrency)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await as i64;
    let sending = first_send.elapsed().as_secs_f64();
    let recorded_deadline = Instant::now() + Duration::from_secs(120);
    // Routing's commit histogram counts every event it committed: polling it costs the
    // database nothing, where counting the messages every 20 ms took about a quarter of a core
    // of PostgreSQL while routing drained. The record is then counted once to confirm.
    if let Some(url) = &args.routing_metrics {
        // Half the wait at most: a counter that never gets there (a restarted routing, more
        // replicas than this one URL) leaves the rest to the record below.
        let gate_deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let committed = histogram(&http, url, COMMIT_HISTOGRAM).await;
            if committed.is_empty() || Instant::now() > gate_deadline {
                eprintln!(
                    "routing's commit histogram did not reach the accepted count; \
                     timing the throughput phase from the record instead"
                );
                break;
            }
            if histogram_count(&commit_before_phase2, &committed) >= accepted as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut end_to_end = first_send.elapsed().as_secs_f64();
    let recorded = loop {
        let now: i64 = sqlx::query_scalar("select count(*) from routing.messages")
            .fetch_one(&pool)
            .await?;
        if now - before >= accepted || Instant::now() > recorded_deadline {
            break now - before;
        }
        // Not all recorded yet (routing said so too early, or could not be asked): the record
        // decides, polled every 50 ms (a count costs PostgreSQL a few ms).
        tokio::time::sleep(Duration::from_millis(50)).await;
        end_to_end = first_send.elapsed().as_secs_f64();
    };

    // Phase 3: handovers at 50/s to conversations that wait for one.
    let mut handover_latencies = Vec::new();
    let mut waiting = Vec::new();
    for i in 0..args.handovers {
        let conversation = Conversation::new(Channel::WhatsApp, &format!("3168{:07}", i));
        let body = conversation
            .inbound(
                &uuid::Uuid::new_v4().simple().to_string(),
                &Content::Text("hi".into()),
            )
            .to_string()
            .into_bytes();
        send(&http, &args.ingress, &handover_shop, body).await?;
        waiting.push(conversation);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sent_at = HashMap::new();
    let calls_before = flows.calls().len();
    for conversation in &waiting {
        let at = Instant::now();
        let (status, _) = call_handover(
            &http,
            &args.ingress,
            &handover_shop.id,
            &handover_shop.handover_secret,
            &Handover {
                conversation_id: conversation.conversation_id.clone(),
                msisdn: conversation.msisdn.clone(),
                ..Handover::default()
            },
        )
        .await?;
        if status == 200 {
            sent_at.insert(conversation.conversation_id.clone(), at);
        } else {
            eprintln!("handover refused with {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handovers_accepted = sent_at.len();
    let calls = flows
        .wait_for_calls(calls_before + handovers_accepted, Duration::from_secs(30))
        .await;
    for call in calls.iter().skip(calls_before) {
        if let Some(at) = call
            .field("messagebird_conversation_id")
            .and_then(|id| sent_at.remove(&id))
        {
            handover_latencies.push(call.at.duration_since(at).as_secs_f64() * 1000.0);
        }
    }
    handover_latencies.sort_by(f64::total_cmp);

    let report = serde_json::json!({
        "workload": {
            "shops": args.shops, "agents_per_shop": args.agents, "new_conversation_share": 0.2,
        },
        "cold_start": {
            "conversations": cold_starts.len(), "assigned": cold.len(),
            "webhook_to_assignment_ms": {
                "p50": percentile(&cold, 0.5), "max": percentile(&cold, 1.0),
            },
        },
        "latency_phase": {
            "offered_per_s": args.rate, "seconds": args.seconds, "sent": total,
            "refused": phase1_refused, "conversations_started": starts.len(),
            "assigned": latencies.len(),
            "webhook_to_assignment_ms": {
                "p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99),
                "max": percentile(&latencies, 1.0),
            },
            "webhook_answered_ms": {
                "p50": percentile(&answered_in, 0.5), "p99": percentile(&answered_in, 0.99),
            },
            // Bucket bounds of routing's histogram (every event of the phase, not only the
            // conversation starts): ingress received → routing committed.
            "received_to_committed_ms_at_most": {
                "p50": histogram_quantile_ms(&commit_before, &commit_after, 0.5),
                "p99": histogram_quantile_ms(&commit_before, &commit_after, 0.99),
            },
        },
        "throughput_phase": {
            "concurrency": args.concurrency, "accepted": accepted, "recorded": recorded,
            "sending_seconds": sending, "end_to_end_seconds": end_to_end,
            "end_to_end_per_s": recorded as f64 / end_to_end,
        },
        "handover_phase": {
            "handovers": args.handovers, "accepted": handovers_accepted,
            "flow_events_received": calls.len() - calls_before,
            "flow_events_matched": handover_latencies.len(),
            "handover_to_flow_event_ms": {
                "p50": percentile(&handover_latencies, 0.5),
                "p99": percentile(&handover_latencies, 0.99),
            },
        },
    });
    println!("{report}");
    Ok(())
}

/// Milliseconds from each send to its assignment, sorted (conversations never assigned are
/// left out; the report counts them).
fn latencies_ms(
    sent: &HashMap<String, SystemTime>,
    assigned: &HashMap<String, SystemTime>,
) -> Vec<f64> {
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(id, sent)| {
            let at = assigned.get(id)?;
            at.duration_since(*sent)
                .ok()
                .map(|d| d.as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// First assignment time per started MessageBird conversation, waiting until all are assigned.
async fn wait_assigned(
    pool: &sqlx::PgPool,
    starts: &HashMap<String, SystemTime>,
    within: Duration,
) -> anyhow::Result<HashMap<String, SystemTime>> {
    let deadline = Instant::now() + within;
    loop {
        let rows = sqlx::query(
            "select c.messagebird_conversation_id as id,
                    extract(epoch from min(a.created_at))::float8 as at
             from routing.assignment_log a join routing.conversations c using (conversation_id)
             where a.kind in ('auto', 'queue')
             group by 1",
        )
        .fetch_all(pool)
        .await?;
        let mut found = HashMap::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            let at: f64 = row.try_get("at")?;
            if starts.contains_key(&id) {
                found.insert(id, SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at));
            }
        }
        if found.len() >= starts.len() || Instant::now() > deadline {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
