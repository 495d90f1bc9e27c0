//! Proof of the slot rules against the real Redis and PostgreSQL: a model-based property test
//! compared step by step with an in-memory reference model, the handover cases, and a
//! concurrency run with a Redis loss in the middle, checked from the assignment log.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use proptest::prelude::*;
use prost::Message as _;
use shopctrl_proto::v1 as pb;
use shopctrl_routing::slots::{
    Assignment, ClaimKind, ClaimOutcome, HandoverOutcome, SlotEngine, SlotError, SlotMetrics,
    SlotService, SlotSettings, UnassignedReason,
};
use shopctrl_routing::store::UNASSIGNED_REASON_SQL;
use shopctrl_testkit::{TcpProxy, TestDatabase, TestRedis};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Harness

/// The part-1 tables this module relies on (columns as agreed for the crate), created only when
/// the crate's own migrations did not create them.
const RECORD_FALLBACK: &str = r#"
create table if not exists customers (customer_id uuid primary key, shop_id text not null,
  msisdn text, messagebird_contact_id text, display_name text not null default '',
  created_at timestamptz not null default now());
create table if not exists conversations (
  conversation_id uuid primary key,
  shop_id text not null,
  messagebird_conversation_id text not null,
  customer_id uuid not null references customers,
  channel smallint not null, channel_id text not null default '',
  state text not null check (state in ('waiting_for_handover','waiting_for_employee','assigned','closed')),
  assignee_employee_id text,
  unassigned_reason text,
  waiting_since timestamptz,
  via_handover boolean not null default false,
  created_at timestamptz not null default now(),
  last_activity_at timestamptz not null default now(),
  closed_at timestamptz);
create table if not exists outbox (
    outbox_id    bigserial primary key,
    event_id     uuid not null unique,
    exchange     text not null,
    routing_key  text not null,
    message_type text not null,
    payload      bytea not null,
    headers      jsonb not null default '[]',
    created_at   timestamptz not null default now());
"#;

struct Harness {
    _db: TestDatabase,
    redis: TestRedis,
    pool: PgPool,
    svc: SlotService,
    metrics: SlotMetrics,
}

async fn harness(pending_ttl: Duration) -> Harness {
    let db = TestDatabase::create().await;
    {
        let admin = db.pool().await;
        sqlx::query("create schema if not exists routing")
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }
    let options = PgConnectOptions::from_str(db.url())
        .unwrap()
        .options([("search_path", "routing"), ("synchronous_commit", "off")]);
    let pool = PgPoolOptions::new()
        .max_connections(12)
        .connect_with(options)
        .await
        .unwrap();
    sqlx::migrate!("./migrations").run(&pool).await.unwrap();
    sqlx::raw_sql(RECORD_FALLBACK).execute(&pool).await.unwrap();
    let redis = TestRedis::create().await;
    let engine = SlotEngine::connect(redis.url(), redis.prefix(), pending_ttl)
        .await
        .unwrap();
    let metrics = SlotMetrics::default();
    let mut settings = SlotSettings::new("test.messaging.flow");
    settings.rebuild_wait = Duration::from_secs(20);
    let svc = SlotService::new(pool.clone(), engine, settings, metrics.clone());
    // A fresh Redis has no epoch: the first use rebuilds (from an empty record).
    svc.ensure_rebuilt().await.unwrap();
    Harness {
        _db: db,
        redis,
        pool,
        svc,
        metrics,
    }
}

/// Loses every slot key of this test at once (one script, so atomically, like a restart or
/// a flush would): the shared server is never flushed.
async fn lose_redis(h: &Harness) {
    let mut conn = h.redis.connection().await;
    let script = redis::Script::new(
        r"local cursor = '0'
          repeat
            local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
            cursor = r[1]
            for _, k in ipairs(r[2]) do redis.call('DEL', k) end
          until cursor == '0'
          return 1",
    );
    let pattern = format!("{}*", h.redis.prefix().replace('[', "\\["));
    let _: i64 = script.arg(pattern).invoke_async(&mut conn).await.unwrap();
}

async fn new_customer(pool: &PgPool, shop: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("insert into customers (customer_id, shop_id, msisdn, display_name) values ($1, $2, $3, 'Customer')")
        .bind(id)
        .bind(shop)
        .bind(format!("31{}", id.as_u128() % 1_000_000_000))
        .execute(pool)
        .await
        .unwrap();
    id
}

/// A conversation as part 1 stores it; `seq` fixes the queue order.
async fn new_conversation(
    pool: &PgPool,
    shop: &str,
    customer: Uuid,
    seq: i64,
    state: &str,
) -> Uuid {
    let id = Uuid::new_v4();
    let reason = (state == "waiting_for_handover").then_some("awaiting_handover");
    sqlx::query(
        "insert into conversations (conversation_id, shop_id, messagebird_conversation_id,
           customer_id, channel, state, unassigned_reason, waiting_since)
         values ($1, $2, $3, $4, 1, $5, $6, timestamptz '2026-01-01' + make_interval(secs => $7))",
    )
    .bind(id)
    .bind(shop)
    .bind(format!("mb-{id}"))
    .bind(customer)
    .bind(state)
    .bind(reason)
    .bind(seq as f64)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn close_in_record(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "update conversations set state = 'closed', assignee_employee_id = null,
           unassigned_reason = null, closed_at = now()
         where conversation_id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

type Row = (String, Option<String>, Option<String>, bool);
type RecordRow = (Uuid, String, Option<String>, Option<String>, bool);

async fn record(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select state, assignee_employee_id, {UNASSIGNED_REASON_SQL}, via_handover
             from conversations c where conversation_id = $1"
    )))
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every conversation's state, assignee, reason and handover flag.
async fn records(pool: &PgPool) -> HashMap<Uuid, Row> {
    let rows: Vec<RecordRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select conversation_id, state, assignee_employee_id, {UNASSIGNED_REASON_SQL},
                    via_handover
             from conversations c"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, s, a, r, v)| (id, (s, a, r, v)))
        .collect()
}

/// Every flow event queued, decoded, oldest first.
async fn all_flow_events(pool: &PgPool) -> Vec<pb::FlowEvent> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "select payload from outbox where message_type = 'shopctrl.messaging.v1.FlowEvent'
         order by outbox_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    payloads
        .into_iter()
        .map(|p| pb::FlowEvent::decode(p.as_slice()).unwrap())
        .collect()
}

/// The flow events queued for a conversation, decoded, oldest first.
async fn flow_events(pool: &PgPool, id: Uuid) -> Vec<pb::FlowEvent> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "select payload from outbox where message_type = 'shopctrl.messaging.v1.FlowEvent'
         order by outbox_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    payloads
        .into_iter()
        .map(|p| pb::FlowEvent::decode(p.as_slice()).unwrap())
        .filter(|e| e.conversation_id == id.to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reference model

const SHOPS: usize = 3;
const EMPLOYEES: usize = 4;
const CUSTOMERS: usize = 4;

fn shop(i: usize) -> String {
    format!("s{i}")
}
fn emp(i: usize) -> String {
    format!("e{i}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum St {
    AwaitHandover,
    Waiting,
    Assigned(usize),
    Closed,
}

#[derive(Debug, Clone)]
struct MConv {
    shop: usize,
    customer: usize,
    seq: i64,
    state: St,
    reason: Option<&'static str>,
    via_handover: bool,
    flow_events: usize,
    last_flow: Option<&'static str>,
}

#[derive(Debug, Default)]
struct Model {
    slots: [u32; SHOPS],
    cand: [[bool; EMPLOYEES]; SHOPS],
    away: [bool; EMPLOYEES],
    convs: Vec<MConv>,
    last: HashMap<(usize, usize), usize>,
    idle: [u64; EMPLOYEES],
    clock: u64,
}

impl Model {
    fn load(&self, e: usize) -> u32 {
        self.convs
            .iter()
            .filter(|c| c.state == St::Assigned(e))
            .count() as u32
    }

    fn stamp(&mut self, e: usize) {
        self.clock += 1;
        self.idle[e] = self.clock;
    }

    /// The claim rule, as the issue states it.
    fn choose(&self, c: usize) -> Result<usize, &'static str> {
        let conv = &self.convs[c];
        let s = conv.shop;
        let slots = self.slots[s];
        if slots == 0 {
            return Err("slots_zero");
        }
        let cands: Vec<usize> = (0..EMPLOYEES).filter(|&e| self.cand[s][e]).collect();
        if cands.is_empty() {
            return Err("no_permission");
        }
        let present: Vec<usize> = cands.into_iter().filter(|&e| !self.away[e]).collect();
        if present.is_empty() {
            return Err("all_away");
        }
        let avail: Vec<usize> = present
            .into_iter()
            .filter(|&e| self.load(e) < slots)
            .collect();
        if avail.is_empty() {
            return Err("all_full");
        }
        if let Some(&sticky) = self.last.get(&(s, conv.customer))
            && avail.contains(&sticky)
        {
            return Ok(sticky);
        }
        Ok(*avail
            .iter()
            .min_by_key(|&&e| (self.load(e), self.idle[e], emp(e)))
            .unwrap())
    }

    /// Claim for a waiting conversation; true when assigned.
    fn claim(&mut self, c: usize, kind: &str) -> bool {
        match self.choose(c) {
            Ok(e) => {
                let (s, cu) = (self.convs[c].shop, self.convs[c].customer);
                self.convs[c].state = St::Assigned(e);
                self.convs[c].reason = None;
                self.stamp(e);
                self.last.insert((s, cu), e);
                if self.convs[c].via_handover {
                    self.convs[c].flow_events += 1;
                    self.convs[c].last_flow = Some(if kind == "handover" {
                        "assigned"
                    } else {
                        "assigned_later"
                    });
                }
                true
            }
            Err(reason) => {
                let s = self.convs[c].shop;
                for conv in &mut self.convs {
                    if conv.shop == s && conv.state == St::Waiting {
                        conv.reason = Some(reason);
                    }
                }
                false
            }
        }
    }

    fn drain(&mut self, shops: Vec<usize>) {
        let mut open = shops;
        loop {
            let next = self
                .convs
                .iter()
                .enumerate()
                .filter(|(_, c)| c.state == St::Waiting && open.contains(&c.shop))
                .min_by_key(|(_, c)| c.seq)
                .map(|(i, c)| (i, c.shop));
            let Some((c, s)) = next else { break };
            if !self.claim(c, "queue") {
                open.retain(|&x| x != s);
            }
        }
    }

    fn drain_employee(&mut self, e: usize) {
        let shops = (0..SHOPS).filter(|&s| self.cand[s][e]).collect();
        self.drain(shops);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Slots(usize, u32),
    Permission(usize, usize, bool),
    Presence(usize, bool),
    Arrive {
        shop: usize,
        customer: usize,
        auto: bool,
    },
    Handover(usize),
    Close(usize),
    Transfer(usize, usize, bool),
    LoseRedis,
    Drift,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..SHOPS, 0u32..4).prop_map(|(s, n)| Op::Slots(s, n)),
        3 => (0..SHOPS, 0..EMPLOYEES, prop::bool::weighted(0.7)).prop_map(|(s, e, a)| Op::Permission(s, e, a)),
        2 => (0..EMPLOYEES, prop::bool::weighted(0.7)).prop_map(|(e, p)| Op::Presence(e, p)),
        6 => (0..SHOPS, 0..CUSTOMERS, any::<bool>()).prop_map(|(shop, customer, auto)| Op::Arrive { shop, customer, auto }),
        3 => (0usize..64).prop_map(Op::Handover),
        4 => (0usize..64).prop_map(Op::Close),
        2 => (0usize..64, 0..EMPLOYEES, any::<bool>()).prop_map(|(c, e, f)| Op::Transfer(c, e, f)),
        1 => Just(Op::LoseRedis),
        1 => Just(Op::Drift),
    ]
}

async fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let h = harness(Duration::from_secs(30)).await;
    let mut m = Model::default();
    let mut ids: Vec<Uuid> = Vec::new();
    let mut customers: HashMap<(usize, usize), Uuid> = HashMap::new();
    let mut seq = 0i64;
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("step {step} {op:?}");
        match *op {
            Op::Slots(s, n) => {
                h.svc.set_shop_slots(&shop(s), n).await.unwrap();
                m.slots[s] = n;
                m.drain(vec![s]);
            }
            Op::Permission(s, e, true) => {
                h.svc
                    .set_permission(&shop(s), &emp(e), "Employee", true)
                    .await
                    .unwrap();
                m.cand[s][e] = true;
                m.drain(vec![s]);
            }
            Op::Permission(s, e, false) => {
                h.svc
                    .set_permission(&shop(s), &emp(e), "", false)
                    .await
                    .unwrap();
                m.cand[s][e] = false;
                let mut back: Vec<usize> = (0..m.convs.len())
                    .filter(|&c| m.convs[c].shop == s && m.convs[c].state == St::Assigned(e))
                    .collect();
                back.sort_by_key(|&c| m.convs[c].seq);
                for c in back {
                    m.convs[c].state = St::Waiting;
                    m.convs[c].reason = Some("all_full");
                    m.stamp(e);
                }
                m.drain(vec![s]);
                m.drain_employee(e);
            }
            Op::Presence(e, present) => {
                h.svc.set_presence(&emp(e), present).await.unwrap();
                m.away[e] = !present;
                m.drain_employee(e);
            }
            Op::Arrive {
                shop: s,
                customer,
                auto,
            } => {
                let cu = match customers.get(&(s, customer)) {
                    Some(id) => *id,
                    None => {
                        let id = new_customer(&h.pool, &shop(s)).await;
                        customers.insert((s, customer), id);
                        id
                    }
                };
                seq += 1;
                let state = if auto {
                    "waiting_for_employee"
                } else {
                    "waiting_for_handover"
                };
                let id = new_conversation(&h.pool, &shop(s), cu, seq, state).await;
                ids.push(id);
                m.convs.push(MConv {
                    shop: s,
                    customer,
                    seq,
                    state: if auto { St::Waiting } else { St::AwaitHandover },
                    reason: (!auto).then_some("awaiting_handover"),
                    via_handover: false,
                    flow_events: 0,
                    last_flow: None,
                });
                if auto {
                    h.svc.assign_waiting(id, ClaimKind::Auto).await.unwrap();
                    m.claim(m.convs.len() - 1, "auto");
                }
            }
            Op::Handover(i) => {
                if ids.is_empty() {
                    continue;
                }
                let c = i % ids.len();
                let got = h.svc.handover(ids[c]).await;
                match m.convs[c].state.clone() {
                    St::Closed => {
                        prop_assert!(matches!(got, Err(SlotError::Closed(_))), "{ctx}: {got:?}");
                    }
                    St::AwaitHandover => {
                        m.convs[c].state = St::Waiting;
                        m.convs[c].via_handover = true;
                        m.convs[c].reason = None;
                        if !m.claim(c, "handover") {
                            m.convs[c].flow_events += 1;
                            m.convs[c].last_flow = Some("waiting");
                        }
                        got.unwrap();
                    }
                    St::Waiting => {
                        m.convs[c].via_handover = true;
                        m.convs[c].flow_events += 1;
                        m.convs[c].last_flow = Some("waiting");
                        let got = got.unwrap();
                        prop_assert!(matches!(got, HandoverOutcome::Waiting { .. }), "{ctx}");
                    }
                    St::Assigned(e) => {
                        m.convs[c].via_handover = true;
                        m.convs[c].flow_events += 1;
                        m.convs[c].last_flow = Some("assigned");
                        prop_assert_eq!(
                            got.unwrap(),
                            HandoverOutcome::Assigned {
                                employee_id: emp(e)
                            },
                            "{}",
                            ctx
                        );
                    }
                }
            }
            Op::Close(i) => {
                if ids.is_empty() {
                    continue;
                }
                let c = i % ids.len();
                if m.convs[c].state == St::Closed {
                    continue;
                }
                close_in_record(&h.pool, ids[c]).await;
                h.svc.conversation_closed(ids[c]).await.unwrap();
                let was = m.convs[c].state.clone();
                m.convs[c].state = St::Closed;
                m.convs[c].reason = None;
                if let St::Assigned(e) = was {
                    m.stamp(e);
                    m.drain_employee(e);
                }
            }
            Op::Transfer(i, e, force) => {
                if ids.is_empty() {
                    continue;
                }
                let c = i % ids.len();
                let got = h.svc.manual_assign(ids[c], &emp(e), force).await;
                let s = m.convs[c].shop;
                match m.convs[c].state.clone() {
                    St::Closed => prop_assert!(matches!(got, Err(SlotError::Closed(_))), "{ctx}"),
                    St::Assigned(x) if x == e => prop_assert_eq!(got.unwrap().0, emp(e)),
                    state => {
                        if !m.cand[s][e] {
                            prop_assert!(
                                matches!(got, Err(SlotError::NoPermission)),
                                "{ctx}: {got:?}"
                            );
                        } else if m.load(e) >= m.slots[s] && !force {
                            prop_assert!(
                                matches!(got, Err(SlotError::NoFreeSlot { .. })),
                                "{ctx}: {got:?}"
                            );
                        } else {
                            prop_assert_eq!(got.unwrap().0, emp(e), "{}", ctx);
                            let cu = m.convs[c].customer;
                            m.convs[c].state = St::Assigned(e);
                            m.convs[c].reason = None;
                            m.stamp(e);
                            m.last.insert((s, cu), e);
                            if m.convs[c].via_handover {
                                m.convs[c].flow_events += 1;
                                m.convs[c].last_flow = Some("assigned_later");
                            }
                            if let St::Assigned(previous) = state {
                                m.drain_employee(previous);
                            }
                        }
                    }
                }
            }
            Op::LoseRedis => {
                lose_redis(&h).await;
                h.svc.ensure_rebuilt().await.unwrap();
            }
            Op::Drift => {
                let repaired = h.svc.check_drift().await.unwrap();
                prop_assert_eq!(repaired, 0, "{}: drift without a cause", ctx);
            }
        }

        // Step by step: the record and Redis say what the model says.
        let rows = records(&h.pool).await;
        let events = all_flow_events(&h.pool).await;
        for (c, id) in ids.iter().enumerate() {
            let (state, assignee, reason, via) = rows[id].clone();
            let mc = &m.convs[c];
            let (want_state, want_assignee) = match &mc.state {
                St::AwaitHandover => ("waiting_for_handover", None),
                St::Waiting => ("waiting_for_employee", None),
                St::Assigned(e) => ("assigned", Some(emp(*e))),
                St::Closed => ("closed", None),
            };
            prop_assert_eq!(&state, want_state, "{}: conversation {} state", ctx, c);
            prop_assert_eq!(
                &assignee,
                &want_assignee,
                "{}: conversation {} assignee",
                ctx,
                c
            );
            prop_assert_eq!(
                reason.as_deref(),
                mc.reason,
                "{}: conversation {} reason",
                ctx,
                c
            );
            prop_assert_eq!(
                via,
                mc.via_handover,
                "{}: conversation {} via handover",
                ctx,
                c
            );
            let mine: Vec<&pb::FlowEvent> = events
                .iter()
                .filter(|e| e.conversation_id == id.to_string())
                .collect();
            prop_assert_eq!(
                mine.len(),
                mc.flow_events,
                "{}: conversation {} flow events",
                ctx,
                c
            );
            if let Some(last) = mine.last() {
                let kind = match &last.outcome {
                    Some(pb::flow_event::Outcome::Assigned(a)) if a.from_queue => "assigned_later",
                    Some(pb::flow_event::Outcome::Assigned(_)) => "assigned",
                    Some(pb::flow_event::Outcome::Waiting(_)) => "waiting",
                    None => "none",
                };
                prop_assert_eq!(
                    Some(kind),
                    mc.last_flow,
                    "{}: conversation {} last flow event",
                    ctx,
                    c
                );
            }
        }
        for e in 0..EMPLOYEES {
            let state = h.svc.engine().inspect(&emp(e)).await.unwrap().unwrap();
            let redis_open: BTreeSet<String> = state.open.into_iter().collect();
            let model_open: BTreeSet<String> = m
                .convs
                .iter()
                .enumerate()
                .filter(|(_, c)| c.state == St::Assigned(e))
                .map(|(i, _)| ids[i].to_string())
                .collect();
            prop_assert_eq!(
                redis_open,
                model_open,
                "{}: employee {} open in Redis",
                ctx,
                e
            );
            prop_assert_eq!(state.live_pending, 0, "{}: pending left behind", ctx);
        }
    }
    check_log(&h.pool).await.map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        max_shrink_iters: 300,
        .. ProptestConfig::default()
    })]

    #[test]
    fn slots_follow_the_reference_model(ops in prop::collection::vec(op(), 1..70)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_model(ops))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants from the assignment log

/// Every automatic claim happened below the shop's limit; over-limit manual assignments are
/// recorded as forced; per conversation, automatic claims never overlap (a conversation is
/// claimed again only after it was released).
async fn check_log(pool: &PgPool) -> Result<LogSummary, String> {
    let rows: Vec<(Uuid, String, String, i32, i32, bool)> = sqlx::query_as(
        "select conversation_id, employee_id, kind, open_count, shop_slots, over_limit
         from assignment_log order by assignment_id",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    let mut summary = LogSummary::default();
    let mut holder: HashMap<Uuid, String> = HashMap::new();
    for (conversation, employee, kind, open, slots, over) in rows {
        match kind.as_str() {
            "auto" | "handover" | "queue" => {
                summary.auto += 1;
                if open >= slots {
                    return Err(format!(
                        "automatic {kind} claim of {conversation} for {employee} with {open} open, limit {slots}"
                    ));
                }
                if let Some(other) = holder.get(&conversation) {
                    return Err(format!(
                        "{conversation} claimed for {employee} while held by {other}"
                    ));
                }
                holder.insert(conversation, employee);
            }
            "manual" | "forced" => {
                if kind == "forced" {
                    summary.forced += 1;
                    if !over || open < slots {
                        return Err(format!("forced row of {conversation} not over the limit"));
                    }
                } else if over || open >= slots {
                    return Err(format!("manual claim of {conversation} over the limit"));
                }
                summary.manual += 1;
                holder.insert(conversation, employee);
            }
            "released" => {}
            "closed" | "withdrawn" => {
                if holder.get(&conversation) == Some(&employee) {
                    holder.remove(&conversation);
                }
                summary.released += 1;
            }
            other => return Err(format!("unknown kind {other}")),
        }
    }
    Ok(summary)
}

#[derive(Debug, Default)]
struct LogSummary {
    auto: u64,
    manual: u64,
    forced: u64,
    released: u64,
}

// ---------------------------------------------------------------------------------------------
// Handover cases

#[tokio::test]
async fn slots_handover_cases() {
    let h = harness(Duration::from_secs(30)).await;
    h.svc.set_shop_slots("s", 1).await.unwrap();
    h.svc.set_permission("s", "ann", "Ann", true).await.unwrap();
    let cu = new_customer(&h.pool, "s").await;

    // Waiting for a handover; the flow asks: claimed, "assigned" (who) goes to the flow.
    let a = new_conversation(&h.pool, "s", cu, 1, "waiting_for_handover").await;
    let first = h.svc.handover(a).await.unwrap();
    assert_eq!(
        first,
        HandoverOutcome::Assigned {
            employee_id: "ann".into()
        }
    );
    // Repeated (the flow retries its HTTP step): no new slot, no change, "assigned" again.
    for _ in 0..9 {
        assert_eq!(h.svc.handover(a).await.unwrap(), first);
    }
    assert_eq!(record(&h.pool, a).await.1.as_deref(), Some("ann"));
    let events = flow_events(&h.pool, a).await;
    assert_eq!(events.len(), 10);
    for event in &events {
        match &event.outcome {
            Some(pb::flow_event::Outcome::Assigned(x)) => {
                assert_eq!(x.employee_id, "ann");
                assert_eq!(x.display_name, "Ann");
                assert!(!x.from_queue);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(event.messagebird_conversation_id, format!("mb-{a}"));
        assert!(event.contact.as_ref().is_some_and(|c| !c.msisdn.is_empty()));
    }
    let claims: i64 =
        sqlx::query_scalar("select count(*) from assignment_log where conversation_id = $1")
            .bind(a)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(claims, 1, "repeated handovers took no second slot");

    // Ann is full: the next handover waits, position 1, "everyone is full".
    let b = new_conversation(&h.pool, "s", cu, 2, "waiting_for_handover").await;
    let c = new_conversation(&h.pool, "s", cu, 3, "waiting_for_handover").await;
    let waiting = HandoverOutcome::Waiting {
        position: 1,
        reason: UnassignedReason::AllFull,
    };
    assert_eq!(h.svc.handover(b).await.unwrap(), waiting);
    assert_eq!(
        h.svc.handover(c).await.unwrap(),
        HandoverOutcome::Waiting {
            position: 2,
            reason: UnassignedReason::AllFull
        }
    );
    // Repeated on a waiting one: "waiting" with the position again, nothing else.
    assert_eq!(h.svc.handover(b).await.unwrap(), waiting);
    assert_eq!(record(&h.pool, b).await.0, "waiting_for_employee");
    let events = flow_events(&h.pool, b).await;
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| matches!(&e.outcome,
        Some(pb::flow_event::Outcome::Waiting(w)) if w.queue_position == 1
            && w.reason == pb::UnassignedReason::AllFull as i32)));

    // Capacity appears (close): the oldest waiting one is assigned at once, and the flow
    // learns it (from the queue).
    close_in_record(&h.pool, a).await;
    assert_eq!(h.svc.conversation_closed(a).await.unwrap(), 1);
    assert_eq!(record(&h.pool, b).await.1.as_deref(), Some("ann"));
    assert_eq!(record(&h.pool, c).await.0, "waiting_for_employee");
    let events = flow_events(&h.pool, b).await;
    assert!(matches!(&events.last().unwrap().outcome,
        Some(pb::flow_event::Outcome::Assigned(x)) if x.from_queue && x.employee_id == "ann"));
    assert_eq!(h.svc.queue_position(c).await.unwrap(), 1);

    // Closed: the caller applies the closed-conversation setting first; asked directly, the
    // service refuses to touch a closed conversation.
    assert!(matches!(h.svc.handover(a).await, Err(SlotError::Closed(_))));

    // Conversations that did not come through a handover produce no flow events.
    let d = new_conversation(&h.pool, "s", cu, 4, "waiting_for_employee").await;
    h.svc.set_shop_slots("s", 3).await.unwrap();
    assert_eq!(record(&h.pool, d).await.1.as_deref(), Some("ann"));
    assert!(flow_events(&h.pool, d).await.is_empty());
}

#[tokio::test]
async fn slots_shared_across_shops_and_reasons() {
    let h = harness(Duration::from_secs(30)).await;
    // Limit 5 at A, 2 at B; one employee in both.
    h.svc.set_shop_slots("a", 5).await.unwrap();
    h.svc.set_shop_slots("b", 2).await.unwrap();
    h.svc.set_shop_slots("z", 0).await.unwrap();
    h.svc.set_permission("a", "e", "E", true).await.unwrap();
    h.svc.set_permission("b", "e", "E", true).await.unwrap();
    h.svc.set_permission("z", "e", "E", true).await.unwrap();
    let ca = new_customer(&h.pool, "a").await;
    let cb = new_customer(&h.pool, "b").await;
    let mut seq = 0;
    let mut next = |shop: &'static str| {
        seq += 1;
        (shop, seq)
    };
    let (s, n) = next("b");
    let b1 = new_conversation(&h.pool, s, cb, n, "waiting_for_employee").await;
    assert!(matches!(
        h.svc.assign_waiting(b1, ClaimKind::Auto).await.unwrap(),
        Assignment::Assigned { .. }
    ));
    // With 1 open from B (limit 2), A (limit 5) can still give 4 more ...
    for _ in 0..4 {
        let (s, n) = next("a");
        let id = new_conversation(&h.pool, s, ca, n, "waiting_for_employee").await;
        assert!(matches!(
            h.svc.assign_waiting(id, ClaimKind::Auto).await.unwrap(),
            Assignment::Assigned { .. }
        ));
    }
    // ... and then nothing from any shop: 5 open.
    let (s, n) = next("a");
    let a5 = new_conversation(&h.pool, s, ca, n, "waiting_for_employee").await;
    assert_eq!(
        h.svc.assign_waiting(a5, ClaimKind::Auto).await.unwrap(),
        Assignment::Waiting {
            reason: UnassignedReason::AllFull
        }
    );
    let (s, n) = next("b");
    let b2 = new_conversation(&h.pool, s, cb, n, "waiting_for_employee").await;
    assert_eq!(
        h.svc.assign_waiting(b2, ClaimKind::Auto).await.unwrap(),
        Assignment::Waiting {
            reason: UnassignedReason::AllFull
        }
    );
    // Slots 0: stored, never auto-assigned, reason says so.
    let cz = new_customer(&h.pool, "z").await;
    let z = new_conversation(&h.pool, "z", cz, 100, "waiting_for_employee").await;
    assert_eq!(
        h.svc.assign_waiting(z, ClaimKind::Auto).await.unwrap(),
        Assignment::Waiting {
            reason: UnassignedReason::SlotsZero
        }
    );
    // Away: everyone away.
    h.svc.set_presence("e", false).await.unwrap();
    assert_eq!(record(&h.pool, a5).await.2.as_deref(), Some("all_away"));
    // Nobody with the permission.
    h.svc.set_permission("b", "e", "", false).await.unwrap();
    assert_eq!(
        record(&h.pool, b2).await.2.as_deref(),
        Some("no_permission")
    );
    // b1 was handed back at its original waiting time, ahead of b2.
    assert_eq!(record(&h.pool, b1).await.0, "waiting_for_employee");
    assert_eq!(h.svc.queue_position(b1).await.unwrap(), 1);
    // Online again, permission back: b1 (oldest) goes first; B's limit 2 is reached with 4
    // open from A, so B gives nothing... A gives a5.
    h.svc.set_presence("e", true).await.unwrap();
    assert_eq!(record(&h.pool, a5).await.1.as_deref(), Some("e"));
    h.svc.set_permission("b", "e", "E", true).await.unwrap();
    assert_eq!(record(&h.pool, b1).await.0, "waiting_for_employee");
    // Manual assignment over the limit needs force and is counted.
    assert!(matches!(
        h.svc.manual_assign(b1, "e", false).await,
        Err(SlotError::NoFreeSlot { open: 5, slots: 2 })
    ));
    assert_eq!(
        h.svc.manual_assign(b1, "e", true).await.unwrap(),
        ("e".to_owned(), true)
    );
    assert_eq!(h.metrics.forced.get(), 1);
    let summary = check_log(&h.pool).await.unwrap();
    assert_eq!(summary.forced, 1);
}

/// A claim whose commit never comes (the process died between the two) holds its slot only
/// until its pending marker expires. Nothing announces that moment, so the periodic sweep is
/// what hands the freed slot to the queue.
#[tokio::test]
async fn an_abandoned_claim_frees_its_slot_for_the_queue_at_the_next_sweep() {
    let h = harness(Duration::from_secs(3)).await;
    h.svc.set_shop_slots("s", 1).await.unwrap();
    h.svc.set_permission("s", "e", "E", true).await.unwrap();
    let customer = new_customer(&h.pool, "s").await;
    let abandoned = new_conversation(&h.pool, "s", customer, 1, "waiting_for_employee").await;
    let waiting = new_conversation(&h.pool, "s", customer, 2, "waiting_for_employee").await;
    // The claim is taken in Redis; the transaction that would record it never happens, and
    // the customer's conversation is closed meanwhile.
    let claim = h
        .svc
        .engine()
        .claim(&abandoned.to_string(), "s", &customer.to_string())
        .await
        .unwrap();
    assert!(matches!(claim, ClaimOutcome::Claimed(_)), "{claim:?}");
    close_in_record(&h.pool, abandoned).await;
    // While the claim is pending the employee is full.
    assert_eq!(
        h.svc
            .assign_waiting(waiting, ClaimKind::Auto)
            .await
            .unwrap(),
        Assignment::Waiting {
            reason: UnassignedReason::AllFull
        }
    );
    assert_eq!(
        h.svc.sweep_waiting().await.unwrap(),
        0,
        "the claim is still live"
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Expired: no event came, the conversation still waits until the sweep.
    assert_eq!(record(&h.pool, waiting).await.0, "waiting_for_employee");
    assert_eq!(h.svc.sweep_waiting().await.unwrap(), 1);
    assert_eq!(record(&h.pool, waiting).await.1.as_deref(), Some("e"));
    assert_eq!(h.metrics.swept.get(), 1);
    // Nothing left to do: the next sweep assigns nothing and the log obeys the slot rule.
    assert_eq!(h.svc.sweep_waiting().await.unwrap(), 0);
    check_log(&h.pool).await.unwrap();
}

/// A customer's further message to a waiting conversation asks for an employee again (a
/// repair), unless every claim of the shop was just refused: then the repeats of that shop
/// are skipped for a moment, while a conversation a message starts is always claimed for,
/// and a reported capacity change ends the pause.
#[tokio::test]
async fn repeats_in_a_shop_that_just_refused_everyone_wait_for_the_pause_or_a_capacity_change() {
    use shopctrl_routing::assign::{Assigner, WaitingConversation};
    use shopctrl_routing::slots::{ReleaseMode, SlotAssigner};

    let h = harness(Duration::from_secs(30)).await;
    sqlx::query(
        "insert into shop_settings (shop_id, enabled, assign_on_first_message,
           new_conversation_on_closed, conversation_slots, version)
         values ('sh', true, true, false, 1, 1)",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into shop_members (shop_id, employee_id, role, chat_permission, display_name)
         values ('sh', 'ann', 1, true, 'Ann')",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    let asking = |id: Uuid, repeat: bool| {
        vec![WaitingConversation {
            conversation_id: id,
            shop_id: "sh".into(),
            repeat,
            span: tracing::Span::none(),
        }]
    };
    // Closed in the record and given back in Redis, with no capacity change reported.
    let free_silently = |id: Uuid| {
        let h = &h;
        async move {
            close_in_record(&h.pool, id).await;
            h.svc
                .engine()
                .release(&id.to_string(), None, ReleaseMode::Close)
                .await
                .unwrap();
        }
    };
    // Longer than this test: what ends the pause here is never the clock.
    let seam = SlotAssigner::new(h.svc.clone()).with_repeat_pause(Duration::from_secs(3600));
    let customer = new_customer(&h.pool, "sh").await;
    let mut waiting = Vec::new();
    for seq in 1..=5 {
        waiting.push(new_conversation(&h.pool, "sh", customer, seq, "waiting_for_employee").await);
    }
    let [first, second, third, fourth, fifth] = waiting[..] else {
        unreachable!("five conversations")
    };
    seam.conversations_waiting(asking(first, false))
        .await
        .unwrap();
    assert_eq!(record(&h.pool, first).await.1.as_deref(), Some("ann"));
    // Ann is full: the repeat is refused, and the shop pauses its repeats.
    seam.conversations_waiting(asking(second, true))
        .await
        .unwrap();
    assert_eq!(record(&h.pool, second).await.0, "waiting_for_employee");
    // A capacity change is reported while she is still full: the drain finds no room, and
    // the pause is over.
    seam.capacity_changed("sh", None).await.unwrap();
    assert_eq!(record(&h.pool, second).await.0, "waiting_for_employee");
    // Her slot frees with no event to say so (as when an abandoned claim expires): the
    // repeat asks again and gets her.
    free_silently(first).await;
    seam.conversations_waiting(asking(second, true))
        .await
        .unwrap();
    assert_eq!(record(&h.pool, second).await.1.as_deref(), Some("ann"));

    // Full again: a repeat is refused and pauses the shop; her slot frees silently, and the
    // next repeat is skipped.
    seam.conversations_waiting(asking(third, true))
        .await
        .unwrap();
    free_silently(second).await;
    seam.conversations_waiting(asking(third, true))
        .await
        .unwrap();
    assert_eq!(
        record(&h.pool, third).await.0,
        "waiting_for_employee",
        "a repeat in a paused shop is skipped"
    );
    assert_eq!(h.metrics.repeats_skipped.get(), 1);
    // A conversation a message starts, or one a redelivery finds waiting, is claimed for in
    // any case.
    seam.conversations_waiting(asking(fourth, false))
        .await
        .unwrap();
    assert_eq!(record(&h.pool, fourth).await.1.as_deref(), Some("ann"));

    // Without a pause every repeat asks again.
    let eager = SlotAssigner::new(h.svc.clone()).with_repeat_pause(Duration::ZERO);
    eager
        .conversations_waiting(asking(fifth, true))
        .await
        .unwrap();
    assert_eq!(record(&h.pool, fifth).await.0, "waiting_for_employee");
    free_silently(fourth).await;
    eager
        .conversations_waiting(asking(fifth, true))
        .await
        .unwrap();
    assert_eq!(record(&h.pool, fifth).await.1.as_deref(), Some("ann"));
}

// ---------------------------------------------------------------------------------------------
// Concurrency, with a Redis loss in the middle

#[derive(Clone, Copy)]
struct ShopSpec {
    slots: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_concurrent_consumers_with_redis_loss() {
    let h = Arc::new(harness(Duration::from_secs(5)).await);
    let shops = [
        ShopSpec { slots: 3 },
        ShopSpec { slots: 5 },
        ShopSpec { slots: 2 },
        ShopSpec { slots: 8 },
        ShopSpec { slots: 0 },
        ShopSpec { slots: 4 },
    ];
    let employees = 14usize;
    for (s, spec) in shops.iter().enumerate() {
        h.svc.set_shop_slots(&shop(s), spec.slots).await.unwrap();
    }
    // Each employee chats for two or three shops; the shops' sets overlap.
    for e in 0..employees {
        for s in [
            e % shops.len(),
            (e * 7 + 3) % shops.len(),
            (e * 5 + 1) % shops.len(),
        ] {
            h.svc
                .set_permission(&shop(s), &emp(e), "E", true)
                .await
                .unwrap();
        }
    }
    h.svc.set_presence(&emp(13), false).await.unwrap();

    const CONVERSATIONS: usize = 3000;
    const CONSUMERS: usize = 4;
    let mut plan = Vec::with_capacity(CONVERSATIONS);
    // One customer per conversation, inserted in bulk; queue order = plan order.
    for i in 0..CONVERSATIONS {
        plan.push((
            Uuid::new_v4(),
            Uuid::new_v4(),
            shop((i * 7919) % shops.len()),
        ));
    }
    let conversation_ids: Vec<Uuid> = plan.iter().map(|p| p.0).collect();
    let customer_ids: Vec<Uuid> = plan.iter().map(|p| p.1).collect();
    let shop_ids: Vec<String> = plan.iter().map(|p| p.2.clone()).collect();
    sqlx::query(
        "insert into customers (customer_id, shop_id, msisdn)
         select c, s, '31' || n from unnest($1::uuid[], $2::text[]) with ordinality as t(c, s, n)",
    )
    .bind(&customer_ids)
    .bind(&shop_ids)
    .execute(&h.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into conversations (conversation_id, shop_id, messagebird_conversation_id,
           customer_id, channel, state, waiting_since)
         select v, s, 'mb-' || v, c, 1, 'waiting_for_employee',
                timestamptz '2026-01-01' + make_interval(secs => n)
         from unnest($1::uuid[], $2::uuid[], $3::text[]) with ordinality as t(v, c, s, n)",
    )
    .bind(&conversation_ids)
    .bind(&customer_ids)
    .bind(&shop_ids)
    .execute(&h.pool)
    .await
    .unwrap();
    let plan: Vec<Uuid> = conversation_ids;
    let plan = Arc::new(plan);
    let processed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let batched = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for consumer in 0..CONSUMERS {
        let h = h.clone();
        let plan = plan.clone();
        let processed = processed.clone();
        let batched = batched.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine: Vec<Uuid> = Vec::new();
            let share: Vec<(usize, Uuid)> = plan
                .iter()
                .copied()
                .enumerate()
                .filter(|(n, _)| n % CONSUMERS == consumer)
                .collect();
            // Half of the consumers claim one conversation at a time, the others a few at
            // once, as a shard does for the conversations of its batch.
            let chunk = if consumer % 2 == 0 { 1 } else { 4 };
            for part in share.chunks(chunk) {
                let mut retry: Vec<Uuid> = Vec::new();
                if part.len() == 1 {
                    retry.push(part[0].1);
                } else {
                    let ids: Vec<Uuid> = part.iter().map(|(_, id)| *id).collect();
                    match h.svc.load_waiting(&ids).await {
                        Ok(loaded) => {
                            let convs = loaded
                                .into_iter()
                                .map(|(c, _)| (c.id, Some(c), tracing::Span::none()))
                                .collect();
                            for (id, result) in h.svc.assign_many(convs, ClaimKind::Auto).await {
                                match result {
                                    Ok(Assignment::Assigned { .. }) => {
                                        batched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        mine.push(id)
                                    }
                                    Ok(_) => {}
                                    Err(e) if e.is_transient() => retry.push(id),
                                    Err(e) => panic!("consumer {consumer}: {e}"),
                                }
                            }
                        }
                        Err(e) if e.is_transient() => retry.extend(ids),
                        Err(e) => panic!("consumer {consumer}: {e}"),
                    }
                }
                // Retry transient failures (a rebuild, a claim in flight) like the consumer does.
                for id in retry {
                    loop {
                        match h.svc.assign_waiting(id, ClaimKind::Auto).await {
                            Ok(Assignment::Assigned { .. }) => {
                                mine.push(id);
                                break;
                            }
                            Ok(_) => break,
                            Err(e) if e.is_transient() => {
                                tokio::time::sleep(Duration::from_millis(5)).await
                            }
                            Err(e) => panic!("consumer {consumer}: {e}"),
                        }
                    }
                }
                for &(n, _) in part {
                    // Agents close conversations as they go (a bit faster than they arrive, so
                    // the queues keep draining).
                    let closes = if n % 4 == 0 { 2 } else { 1 };
                    for _ in 0..closes {
                        // Any assigned conversation (also those assigned from the queue).
                        let pick: Option<Uuid> = sqlx::query_scalar(
                            "select conversation_id from conversations where state = 'assigned'
                         order by random() limit 1",
                        )
                        .fetch_optional(&h.pool)
                        .await
                        .unwrap();
                        let Some(done) = pick else { break };
                        mine.retain(|c| *c != done);
                        close_in_record(&h.pool, done).await;
                        loop {
                            match h.svc.conversation_closed(done).await {
                                Ok(_) => break,
                                Err(e) if e.is_transient() => {
                                    tokio::time::sleep(Duration::from_millis(5)).await
                                }
                                Err(e) => panic!("consumer {consumer}: close {e}"),
                            }
                        }
                    }
                    // Now and then a forced transfer, or a shop lowering its limit.
                    if n % 41 == 0 {
                        let pick: Option<Uuid> = sqlx::query_scalar(
                            "select conversation_id from conversations where state = 'assigned'
                         order by random() limit 1",
                        )
                        .fetch_optional(&h.pool)
                        .await
                        .unwrap();
                        if let Some(id) = pick {
                            let target = emp((n / 41) % 13);
                            match h.svc.manual_assign(id, &target, true).await {
                                Ok(_)
                                | Err(SlotError::NoPermission)
                                | Err(SlotError::Busy)
                                | Err(SlotError::Closed(_))
                                | Err(SlotError::Rebuilding) => {}
                                Err(e) => panic!("transfer: {e}"),
                            }
                        }
                    }
                    if n == 1500 {
                        h.svc.set_shop_slots(&shop(1), 2).await.unwrap();
                    }
                    processed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    // The Redis loss, in the middle of the run.
    {
        let h = h.clone();
        let processed = processed.clone();
        tasks.push(tokio::spawn(async move {
            while processed.load(std::sync::atomic::Ordering::Relaxed) < CONVERSATIONS / 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lose_redis(&h).await;
        }));
    }
    // A drift checker running alongside, as in production.
    let checker = {
        let h = h.clone();
        tokio::spawn(async move {
            loop {
                let _ = h.svc.check_drift().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    checker.abort();
    let _ = checker.await;
    assert!(
        h.metrics.rebuilds.get() >= 2,
        "the loss was detected and rebuilt"
    );

    // Quiet now: a last drain of every shop (what the periodic check and events do), then the
    // invariants.
    let all: Vec<String> = (0..shops.len()).map(shop).collect();
    h.svc.drain_shops(&all).await.unwrap();
    let summary = check_log(&h.pool).await.unwrap();
    let batched = batched.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("concurrency run: {summary:?}, {batched} assigned by batched claims");
    assert!(summary.auto > 1500, "{summary:?}");
    // Most assignments come from the queue as agents close; claims made on arrival succeed
    // about 150 times in a run, so a handful shows the batched path committing.
    assert!(batched > 20, "the batched claims took part: {batched}");

    // Redis equals the record, employee by employee, and no conversation is counted twice.
    assert_eq!(h.svc.check_drift().await.unwrap(), 0, "no drift at rest");
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for e in 0..employees {
        let state = h.svc.engine().inspect(&emp(e)).await.unwrap().unwrap();
        assert_eq!(state.live_pending, 0);
        let record: BTreeSet<String> = sqlx::query_scalar(
            "select conversation_id::text from conversations
             where state = 'assigned' and assignee_employee_id = $1",
        )
        .bind(emp(e))
        .fetch_all(&h.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        let redis: BTreeSet<String> = state.open.into_iter().collect();
        assert_eq!(redis, record, "employee {e}");
        for c in redis {
            assert!(
                seen.insert(c.clone(), emp(e)).is_none(),
                "{c} counted twice"
            );
        }
    }

    // Everything assignable was assigned: for each shop with waiting conversations, no present
    // candidate is below the shop's limit.
    let waiting: Vec<(String, i64)> = sqlx::query_as(
        "select shop_id, count(*) from conversations where state = 'waiting_for_employee'
         group by shop_id",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    for (s, n) in waiting {
        let slots: i32 = sqlx::query_scalar("select slots from slot_shops where shop_id = $1")
            .bind(&s)
            .fetch_one(&h.pool)
            .await
            .unwrap();
        let free: Vec<(String, i64)> = sqlx::query_as(
            "select c.employee_id,
                    (select count(*) from conversations x
                     where x.state = 'assigned' and x.assignee_employee_id = c.employee_id) as open
             from slot_candidates c
             where c.shop_id = $1
               and not exists (select 1 from slot_away a where a.employee_id = c.employee_id)",
        )
        .bind(&s)
        .fetch_all(&h.pool)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, open)| *open < slots as i64)
        .collect();
        assert!(
            slots == 0 || free.is_empty(),
            "shop {s}: {n} waiting while {free:?} have room (limit {slots})"
        );
    }
    // The waiting ones of the slots-0 shop carry that reason.
    let reasons: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select distinct {UNASSIGNED_REASON_SQL} from conversations c
             where state = 'waiting_for_employee' and shop_id = $1"
    )))
    .bind(shop(4))
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(reasons, vec![Some("slots_zero".to_owned())]);
}

// ---------------------------------------------------------------------------------------------
// Through part 1's seam: config synced from the local copy, handovers on unknown and closed
// conversations, withdrawal.

#[tokio::test]
async fn slots_seam_handover_unknown_closed_and_withdrawal() {
    use shopctrl_routing::assign::Assigner;
    use shopctrl_routing::slots::SlotAssigner;

    let h = harness(Duration::from_secs(30)).await;
    let seam = SlotAssigner::new(h.svc.clone());
    // Part 1's local copy of the config service's data.
    sqlx::query(
        "insert into shop_settings (shop_id, enabled, assign_on_first_message,
           new_conversation_on_closed, conversation_slots, version)
         values ('sh', true, false, false, 2, 1)",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into shop_members (shop_id, employee_id, role, chat_permission, display_name)
         values ('sh', 'ann', 1, true, 'Ann'), ('sh', 'bob', 1, false, 'Bob')",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    let request = pb::HandoverRequest {
        shop_id: "sh".into(),
        messagebird_conversation_id: "mb-x".into(),
        msisdn: "+31 6 1234 5678".into(),
        ..Default::default()
    };
    let open_one = |pool: PgPool| async move {
        sqlx::query_as::<_, (Uuid, String, Option<String>, bool)>(
            "select conversation_id, state, assignee_employee_id, via_handover from conversations
             where shop_id = 'sh' and messagebird_conversation_id = 'mb-x' and state <> 'closed'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    // Unknown conversation (the handover overtook the message): created and claimed.
    seam.handover(request.clone()).await.unwrap();
    let (first, state, assignee, via) = open_one(h.pool.clone()).await;
    assert_eq!(
        (state.as_str(), assignee.as_deref(), via),
        ("assigned", Some("ann"), true)
    );
    let msisdn: Option<String> = sqlx::query_scalar(
        "select cu.msisdn from conversations c join customers cu using (customer_id)
         where c.conversation_id = $1",
    )
    .bind(first)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(msisdn.as_deref(), Some("31612345678"));
    // Repeated: nothing changes, the flow hears "assigned" again.
    seam.handover(request.clone()).await.unwrap();
    assert_eq!(open_one(h.pool.clone()).await.0, first);
    assert_eq!(flow_events(&h.pool, first).await.len(), 2);

    // Closed, setting "new conversation on closed" off: the same conversation is reopened.
    close_in_record(&h.pool, first).await;
    seam.capacity_changed("sh", Some("ann")).await.unwrap();
    assert_eq!(
        h.svc
            .engine()
            .inspect("ann")
            .await
            .unwrap()
            .unwrap()
            .open
            .len(),
        0
    );
    seam.handover(request.clone()).await.unwrap();
    let (again, state, assignee, _) = open_one(h.pool.clone()).await;
    assert_eq!(again, first);
    assert_eq!(
        (state.as_str(), assignee.as_deref()),
        ("assigned", Some("ann"))
    );

    // Setting on: a new conversation.
    sqlx::query(
        "update shop_settings set new_conversation_on_closed = true, version = 2 where shop_id = 'sh'",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    close_in_record(&h.pool, first).await;
    seam.capacity_changed("sh", Some("ann")).await.unwrap();
    seam.handover(request.clone()).await.unwrap();
    let (second, state, assignee, _) = open_one(h.pool.clone()).await;
    assert_ne!(second, first);
    assert_eq!(
        (state.as_str(), assignee.as_deref()),
        ("assigned", Some("ann"))
    );

    // Bob has no Chat permission: a manual assignment to him is refused.
    assert!(matches!(
        seam.manual_assign(second, "bob", true).await,
        Err(shopctrl_routing::assign::AssignError::Refused(_))
    ));
    // The limit is lowered to 1 and the change reported: Ann keeps her conversation.
    sqlx::query(
        "update shop_settings set conversation_slots = 1, version = 3 where shop_id = 'sh'",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    seam.capacity_changed("sh", None).await.unwrap();
    assert_eq!(record(&h.pool, second).await.1.as_deref(), Some("ann"));
    // Ann loses the role (part 1 removed the member first): her conversation goes back to the
    // queue, nobody else may chat, so it waits with that reason.
    sqlx::query("delete from shop_members where shop_id = 'sh' and employee_id = 'ann'")
        .execute(&h.pool)
        .await
        .unwrap();
    seam.role_withdrawn("sh", "ann").await.unwrap();
    let (state, assignee, reason, _) = record(&h.pool, second).await;
    assert_eq!(
        (state.as_str(), assignee, reason.as_deref()),
        ("waiting_for_employee", None, Some("no_permission"))
    );
    // Bob gets the permission: the waiting conversation is his at once.
    sqlx::query("update shop_members set chat_permission = true where employee_id = 'bob'")
        .execute(&h.pool)
        .await
        .unwrap();
    seam.capacity_changed("sh", Some("bob")).await.unwrap();
    assert_eq!(record(&h.pool, second).await.1.as_deref(), Some("bob"));
    let events = flow_events(&h.pool, second).await;
    assert!(matches!(&events.last().unwrap().outcome,
        Some(pb::flow_event::Outcome::Assigned(a)) if a.from_queue && a.employee_id == "bob" && a.display_name == "Bob"));
    check_log(&h.pool).await.unwrap();
}

/// A conversation created inside a batch's transaction, waiting for an employee.
async fn insert_waiting(tx: &mut sqlx::PgConnection, shop: &str, customer: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into conversations (conversation_id, shop_id, messagebird_conversation_id,
           customer_id, channel, state, waiting_since)
         values ($1, $2, $3, $4, 1, 'waiting_for_employee', now())",
    )
    .bind(id)
    .bind(shop)
    .bind(format!("mb-{id}"))
    .bind(customer)
    .execute(tx)
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn claims_in_a_batch_transaction_count_only_when_it_commits() {
    let h = harness(Duration::from_secs(30)).await;
    h.svc.set_shop_slots("s", 1).await.unwrap();
    h.svc.set_permission("s", "e", "E", true).await.unwrap();
    let customer = new_customer(&h.pool, "s").await;
    let log_rows = |id: Uuid| {
        let pool = h.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from assignment_log where conversation_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // The batch rolls back: its claim is given back and nothing is recorded.
    let mut tx = h.pool.begin().await.unwrap();
    let a = insert_waiting(&mut tx, "s", customer).await;
    let claims = h
        .svc
        .claim_in_batch(&mut tx, &[(a, tracing::Span::none())])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(claims.settle(false).await.is_empty());
    // Given back once the record can be trusted to show a commit that went through (about a
    // second), long before the pending marker would expire.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = h.svc.engine().inspect("e").await.unwrap().unwrap();
        if (state.open.len(), state.live_pending) == (0, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim of a batch that rolled back was not given back: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log_rows(a).await, 0);

    // The batch commits: the assignment commits with it, Redis counts it, logged once.
    let mut tx = h.pool.begin().await.unwrap();
    let b = insert_waiting(&mut tx, "s", customer).await;
    let claims = h
        .svc
        .claim_in_batch(&mut tx, &[(b, tracing::Span::none())])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        claims.settle(true).await,
        std::collections::HashSet::from([b])
    );
    let row = record(&h.pool, b).await;
    assert_eq!((row.0.as_str(), row.1.as_deref()), ("assigned", Some("e")));
    let state = h.svc.engine().inspect("e").await.unwrap().unwrap();
    assert_eq!((state.open.len(), state.live_pending), (1, 0));
    assert_eq!(log_rows(b).await, 1);

    // The only slot is taken: refused inside the batch. Before the batch commits, the slot
    // frees (b closes) and the drain finds nothing, since it cannot see the uncommitted c. So
    // a refusal is not final: it is left to the claim after the commit, which takes the slot.
    let mut tx = h.pool.begin().await.unwrap();
    let c = insert_waiting(&mut tx, "s", customer).await;
    let claims = h
        .svc
        .claim_in_batch(&mut tx, &[(c, tracing::Span::none())])
        .await
        .unwrap();
    close_in_record(&h.pool, b).await;
    h.svc.conversation_closed(b).await.unwrap();
    tx.commit().await.unwrap();
    assert!(
        claims.settle(true).await.is_empty(),
        "a refusal is left to the follow-up"
    );
    assert_eq!(record(&h.pool, c).await.0, "waiting_for_employee");
    assert_eq!(
        h.svc.assign_waiting(c, ClaimKind::Auto).await.unwrap(),
        Assignment::Assigned {
            employee_id: "e".into()
        }
    );
    assert_eq!(log_rows(c).await, 1);
    assert_eq!(
        h.svc.check_drift().await.unwrap(),
        0,
        "Redis equals the record"
    );
}

/// A second service on the harness's record and keys, whose Redis connection goes through a
/// proxy the test cuts.
async fn proxied_service(h: &Harness, pending_ttl: Duration) -> (SlotService, TcpProxy) {
    let host_port = h
        .redis
        .url()
        .trim_start_matches("redis://")
        .rsplit('@')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let proxy = TcpProxy::start(&host_port).await;
    let engine = SlotEngine::connect(
        &format!("redis://{}/", proxy.addr()),
        h.redis.prefix(),
        pending_ttl,
    )
    .await
    .unwrap();
    let svc = SlotService::new(
        h.pool.clone(),
        engine,
        SlotSettings::new("test.messaging.flow"),
        SlotMetrics::default(),
    );
    (svc, proxy)
}

/// A batch that did not commit has its claims given back in the background, retried while
/// Redis is out of reach. Once the claim could have expired, a retry must not give anything
/// back: the conversation may have been claimed again (here for the same employee), and
/// rolling back would take that newer claim and free a slot that is in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_retry_never_gives_back_a_newer_claim() {
    let h = harness(Duration::from_secs(30)).await;
    h.svc.set_shop_slots("s", 1).await.unwrap();
    h.svc.set_permission("s", "e", "E", true).await.unwrap();
    let customer = new_customer(&h.pool, "s").await;
    let (svc, proxy) = proxied_service(&h, Duration::from_secs(2)).await;
    let id = new_conversation(&h.pool, "s", customer, 1, "waiting_for_employee").await;

    // The batch claims, then fails to commit; Redis is unreachable when it tries to settle.
    let mut tx = h.pool.begin().await.unwrap();
    let claims = svc
        .claim_in_batch(&mut tx, &[(id, tracing::Span::none())])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    proxy.cut();
    assert!(claims.settle(false).await.is_empty());
    // The claim expires (2 s) and the conversation is claimed again, for e (the only one).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let again = h
        .svc
        .engine()
        .claim(&id.to_string(), "s", &customer.to_string())
        .await
        .unwrap();
    assert!(matches!(again, ClaimOutcome::Claimed(_)), "{again:?}");
    // Redis is back while the first claim's settle still retries (its next try is due at 3 s).
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let state = h.svc.engine().inspect("e").await.unwrap().unwrap();
    assert_eq!(
        state.live_pending, 1,
        "the newer claim still holds e's slot: {state:?}"
    );
}

/// A claim whose commit went through but whose confirmation Redis did not hear (the
/// connection dropped in between) must still be counted once the pending marker would have
/// expired: the confirmation is retried from the record in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_redis_missed_is_retried_from_the_record() {
    let h = harness(Duration::from_secs(30)).await;
    h.svc.set_shop_slots("s", 1).await.unwrap();
    h.svc.set_permission("s", "e", "E", true).await.unwrap();
    let customer = new_customer(&h.pool, "s").await;
    let (svc, proxy) = proxied_service(&h, Duration::from_secs(2)).await;

    let mut tx = h.pool.begin().await.unwrap();
    let id = insert_waiting(&mut tx, "s", customer).await;
    let claims = svc
        .claim_in_batch(&mut tx, &[(id, tracing::Span::none())])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    proxy.cut();
    assert!(
        claims.settle(true).await.is_empty(),
        "Redis was unreachable: not confirmed now"
    );
    proxy.restore();
    // Past the pending marker's 2 s: without the retry Redis would count nothing for e.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = h.svc.engine().inspect("e").await.unwrap().unwrap();
    assert_eq!(
        (state.open.clone(), state.live_pending),
        (vec![id.to_string()], 0),
        "the committed claim is counted: {state:?}"
    );
    // So the employee is full, as the record says.
    let other = new_conversation(&h.pool, "s", customer, 1, "waiting_for_employee").await;
    assert_eq!(
        h.svc.assign_waiting(other, ClaimKind::Auto).await.unwrap(),
        Assignment::Waiting {
            reason: UnassignedReason::AllFull
        }
    );
    assert_eq!(
        h.svc.check_drift().await.unwrap(),
        0,
        "Redis equals the record"
    );
    check_log(&h.pool).await.unwrap();
}

/// The periodic check repairs drift either way, each counted: a conversation Redis no longer
/// counts for its assignee, and one Redis still counts for an employee the record has nothing
/// open for (a close whose release never reached Redis), who meanwhile lost the permission, so
/// that only Redis still knows them.
#[tokio::test]
async fn drift_either_way_is_repaired_from_the_record_and_counted() {
    let h = harness(Duration::from_secs(30)).await;
    h.svc.set_shop_slots("s", 2).await.unwrap();
    h.svc.set_permission("s", "e", "E", true).await.unwrap();
    h.svc.set_permission("s", "f", "F", true).await.unwrap();
    // Two customers: the second is not sticky to the first one's employee.
    let (first, second) = (
        new_customer(&h.pool, "s").await,
        new_customer(&h.pool, "s").await,
    );
    let a = new_conversation(&h.pool, "s", first, 1, "waiting_for_employee").await;
    let b = new_conversation(&h.pool, "s", second, 2, "waiting_for_employee").await;
    let mut owners = Vec::new();
    for id in [a, b] {
        match h.svc.assign_waiting(id, ClaimKind::Auto).await.unwrap() {
            Assignment::Assigned { employee_id } => owners.push(employee_id),
            other => panic!("{id} was not assigned: {other:?}"),
        }
    }
    let (owner_a, owner_b) = (owners[0].clone(), owners[1].clone());
    assert_ne!(owner_a, owner_b, "the least loaded takes the second");
    assert_eq!(h.svc.check_drift().await.unwrap(), 0, "no drift yet");

    // Redis forgets a.
    let mut conn = h.redis.connection().await;
    let open_a = format!("{}emp:{owner_a}:open", h.svc.engine().key_prefix());
    let removed: i64 = redis::cmd("SREM")
        .arg(&open_a)
        .arg(a.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    // The record closes b without telling Redis; then b's owner loses the permission.
    close_in_record(&h.pool, b).await;
    h.svc
        .set_permission("s", &owner_b, "", false)
        .await
        .unwrap();
    assert_eq!(
        h.svc
            .engine()
            .inspect(&owner_b)
            .await
            .unwrap()
            .unwrap()
            .open,
        vec![b.to_string()],
        "Redis still counts b"
    );

    assert_eq!(h.svc.check_drift().await.unwrap(), 2);
    assert_eq!(h.metrics.repairs.get(), 2);
    let state_a = h.svc.engine().inspect(&owner_a).await.unwrap().unwrap();
    assert_eq!(state_a.open, vec![a.to_string()]);
    let state_b = h.svc.engine().inspect(&owner_b).await.unwrap().unwrap();
    assert!(state_b.open.is_empty(), "{state_b:?}");
    assert_eq!(h.svc.check_drift().await.unwrap(), 0, "repaired for good");
    assert_eq!(h.metrics.repairs.get(), 2);
}

/// The drift check's list of employees Redis knows is read in several HSCAN steps on a large
/// staff; every employee comes back.
#[tokio::test]
async fn every_employee_redis_keeps_a_state_for_is_listed_on_a_large_staff() {
    let h = harness(Duration::from_secs(30)).await;
    let staff: BTreeSet<String> = (0..1_500).map(|i| format!("employee-{i}")).collect();
    for employee in &staff {
        assert!(h.svc.engine().set_present(employee, true).await.unwrap());
    }
    let listed = h.svc.engine().known_employees().await.unwrap();
    assert!(listed.len() >= staff.len(), "{} listed", listed.len());
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), staff);
}

fn routing_employee(id: &str, name: &str, role: pb::Role, chat: bool) -> pb::RoutingEmployee {
    pb::RoutingEmployee {
        employee_id: id.into(),
        display_name: name.into(),
        role: role as i32,
        chat_permission: chat,
    }
}

async fn members(pool: &PgPool, shop: &str) -> Vec<(String, i16, bool, String)> {
    sqlx::query_as(
        "select employee_id, role, chat_permission, display_name from shop_members
         where shop_id = $1 order by employee_id",
    )
    .bind(shop)
    .fetch_all(pool)
    .await
    .unwrap()
}

// A member change refetches the whole shop and resyncs its candidates, so both are written
// in bulk: this pins down what the bulk statements must still do (replace the member list,
// skip members without a role, leave unchanged rows alone, grant in Redis too).
#[tokio::test]
async fn a_refetched_shop_replaces_its_members_and_grants_in_bulk() {
    let h = harness(Duration::from_secs(30)).await;
    let employee = pb::Role::ShopEmployee;
    let mut shop = pb::RoutingShop {
        shop_id: "bulk".into(),
        enabled: true,
        conversation_slots: 1,
        version: 1,
        employees: vec![
            routing_employee("ann", "Ann", employee, true),
            routing_employee("bob", "Bob", employee, true),
            routing_employee("cid", "Cid", employee, false),
            routing_employee("gus", "Gus", employee, true),
            routing_employee("eve", "Eve", pb::Role::Unspecified, true),
        ],
        ..Default::default()
    };
    let mut conn = h.pool.acquire().await.unwrap();
    shopctrl_routing::access::store_routing_shop(&mut conn, &shop)
        .await
        .unwrap();
    let first = members(&h.pool, "bulk").await;
    assert_eq!(
        first.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
        ["ann", "bob", "cid", "gus"],
        "a member without a role is not stored"
    );
    let version_of = |who: &'static str| {
        let pool = h.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "select xmin::text || '/' || xmax::text from shop_members
                 where shop_id = 'bulk' and employee_id = $1",
            )
            .bind(who)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let ann_before = version_of("ann").await;

    // Bob renamed, Cid granted Chat, Gus gone, Dan new (listed twice: the last one counts);
    // Ann unchanged.
    shop.version = 2;
    shop.employees = vec![
        routing_employee("ann", "Ann", employee, true),
        routing_employee("dan", "Dan", employee, true),
        routing_employee("bob", "Robert", employee, true),
        routing_employee("cid", "Cid", employee, true),
        routing_employee("dan", "Dan", pb::Role::ShopAdmin, false),
    ];
    shopctrl_routing::access::store_routing_shop(&mut conn, &shop)
        .await
        .unwrap();
    assert_eq!(
        members(&h.pool, "bulk").await,
        vec![
            ("ann".into(), employee as i16, true, "Ann".into()),
            ("bob".into(), employee as i16, true, "Robert".into()),
            ("cid".into(), employee as i16, true, "Cid".into()),
            (
                "dan".into(),
                pb::Role::ShopAdmin as i16,
                false,
                "Dan".into()
            ),
        ]
    );
    assert_eq!(
        version_of("ann").await,
        ann_before,
        "an unchanged member is neither rewritten nor locked"
    );

    // A shop without members keeps none.
    shop.version = 3;
    shop.employees.clear();
    shopctrl_routing::access::store_routing_shop(&mut conn, &shop)
        .await
        .unwrap();
    drop(conn);
    assert!(members(&h.pool, "bulk").await.is_empty());

    // The candidates, in one call: in the record and in Redis (a claim finds them).
    h.svc.set_shop_slots("bulk", 1).await.unwrap();
    // Bob first known under his old name: the sync renames him.
    h.svc
        .apply_grants("bulk", &[("bob".to_owned(), "Bob".to_owned())])
        .await
        .unwrap();
    let grants = [
        ("ann".to_owned(), "Ann".to_owned()),
        ("bob".to_owned(), "Robert".to_owned()),
    ];
    h.svc.apply_grants("bulk", &grants).await.unwrap();
    h.svc.apply_grants("bulk", &grants).await.unwrap();
    assert_eq!(h.svc.candidates("bulk").await.unwrap(), ["ann", "bob"]);
    let names: Vec<(String, String)> = sqlx::query_as(
        "select employee_id, display_name from slot_display_names order by employee_id",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        names,
        [
            ("ann".into(), "Ann".into()),
            ("bob".into(), "Robert".into())
        ]
    );
    let customer = new_customer(&h.pool, "bulk").await;
    let mut taken = BTreeSet::new();
    for seq in 0..3 {
        let id = new_conversation(&h.pool, "bulk", customer, seq, "waiting_for_employee").await;
        match h.svc.assign_waiting(id, ClaimKind::Auto).await.unwrap() {
            Assignment::Assigned { employee_id, .. } => {
                taken.insert(employee_id);
            }
            other => assert_eq!(seq, 2, "only the third waits, got {other:?}"),
        }
    }
    assert_eq!(taken, BTreeSet::from(["ann".to_owned(), "bob".to_owned()]));
}

// Lua's unpack stops at a few thousand values; a shop's staff has no such bound, so both the
// sync's grant and the claim's read of the candidates go in parts.
#[tokio::test]
async fn a_shop_with_ten_thousand_chat_employees_is_synced_and_claimed_for() {
    let h = harness(Duration::from_secs(30)).await;
    h.svc.set_shop_slots("big", 1).await.unwrap();
    let staff: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("agent-{i:05}"), format!("Agent {i}")))
        .collect();
    h.svc.apply_grants("big", &staff).await.unwrap();
    assert_eq!(h.svc.candidates("big").await.unwrap().len(), staff.len());
    let customer = new_customer(&h.pool, "big").await;
    let id = new_conversation(&h.pool, "big", customer, 1, "waiting_for_employee").await;
    assert!(matches!(
        h.svc.assign_waiting(id, ClaimKind::Auto).await.unwrap(),
        Assignment::Assigned { .. }
    ));
}
