//! Assignment on top of the engine: PostgreSQL is the record (conversations, the assignment
//! log, stickiness), Redis follows it. Every claim is pending in Redis, committed in
//! PostgreSQL (fenced on the Redis epoch), then confirmed; a failed commit gives the slot back.

use std::{
    collections::{BTreeSet, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use prost::Message as _;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use shopctrl_amqp::{OutboxMessage, outbox_enqueue};
use shopctrl_proto::v1 as pb;

use super::{
    AssignOutcome, ClaimOutcome, Claimed, ConfirmOutcome, RebuildStart, ReleaseMode,
    ReleaseOutcome, SlotEngine, SlotError, SlotMetrics, UnassignedReason,
};

/// How many claims run at the same time. Claims of different conversations are independent
/// (the script decides atomically), and each is a round trip or more, so running them one by
/// one would cap a shard at a few hundred assignments per second.
pub(crate) const CONCURRENT_CLAIMS: usize = 8;

/// How an automatic claim came about (the assignment log's kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// On the customer's first message (assign on first message = on).
    Auto,
    /// On a flow's handover request.
    Handover,
    /// A waiting conversation claimed when capacity appeared.
    Queue,
}

impl ClaimKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Handover => "handover",
            Self::Queue => "queue",
        }
    }
}

/// The result of trying to assign a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    Assigned {
        employee_id: String,
    },
    Waiting {
        reason: UnassignedReason,
    },
    /// The conversation is not waiting for an employee (closed, awaiting a handover, or
    /// assigned by someone else meanwhile).
    NotWaiting {
        state: String,
    },
}

/// What a handover request led to (the flow event that was queued says the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverOutcome {
    Assigned {
        employee_id: String,
    },
    Waiting {
        position: u32,
        reason: UnassignedReason,
    },
}

/// Settings of the slot service.
#[derive(Debug, Clone)]
pub struct SlotSettings {
    /// Exchange flow events go to (`Names::flow_exchange()`), routing key `flow`.
    pub flow_exchange: String,
    /// How long a rebuild lease lasts.
    pub rebuild_lease: Duration,
    /// How long a caller waits for another replica's rebuild before giving up (transient).
    pub rebuild_wait: Duration,
}

impl SlotSettings {
    pub fn new(flow_exchange: impl Into<String>) -> Self {
        Self {
            flow_exchange: flow_exchange.into(),
            rebuild_lease: Duration::from_secs(30),
            rebuild_wait: Duration::from_secs(10),
        }
    }
}

/// One conversation as the slot logic sees it.
#[derive(Debug, Clone)]
pub struct Conv {
    pub id: Uuid,
    pub shop_id: String,
    customer_id: String,
    state: String,
    assignee: Option<String>,
    via_handover: bool,
    unassigned_reason: Option<String>,
    messagebird_conversation_id: String,
    contact: pb::InboundContact,
}

impl Conv {
    /// Whether the batched claim paths take it: waiting for an employee and not from a
    /// handover (whose claim also queues a flow event, see `commit_tx`).
    fn claimable_in_bulk(&self) -> bool {
        !self.via_handover && self.state == "waiting_for_employee"
    }
}

/// The columns [`Conv`] is read from, and their tables (`c` the conversation).
const CONV_COLUMNS: &str = concat!(
    "c.conversation_id, c.shop_id, c.customer_id::text as customer_id, c.state,
     c.assignee_employee_id, c.via_handover, ",
    crate::store::unassigned_reason_sql!(),
    " as unassigned_reason, c.messagebird_conversation_id,
     coalesce(cu.msisdn, '') as msisdn,
     coalesce(cu.messagebird_contact_id, '') as contact_id,
     coalesce(cu.display_name, '') as contact_name"
);
const CONV_FROM: &str =
    "from conversations c left join customers cu on cu.customer_id = c.customer_id";

fn conv_from_row(row: &sqlx::postgres::PgRow) -> Result<Conv, SlotError> {
    Ok(Conv {
        id: row.try_get("conversation_id")?,
        shop_id: row.try_get("shop_id")?,
        customer_id: row.try_get("customer_id")?,
        state: row.try_get("state")?,
        assignee: row.try_get("assignee_employee_id")?,
        via_handover: row.try_get("via_handover")?,
        unassigned_reason: row.try_get("unassigned_reason")?,
        messagebird_conversation_id: row.try_get("messagebird_conversation_id")?,
        contact: pb::InboundContact {
            messagebird_contact_id: row.try_get("contact_id")?,
            msisdn: row.try_get("msisdn")?,
            display_name: row.try_get("contact_name")?,
        },
    })
}

const CLAIM_ATTEMPTS: usize = 4;
const DRAIN_LIMIT: usize = 100_000;
/// Background settling of a claim whose fate Redis did not hear: first try after the given
/// wait, then doubling up to this cap, until this long has passed.
const SETTLE_WAIT_CAP: Duration = Duration::from_secs(5);
const SETTLE_FOR: Duration = Duration::from_secs(60);
/// Beyond this many background settles at once (a long outage at high load), new ones are not
/// started: their claims expire by themselves and the drift check repairs the counts.
const SETTLE_MAX_OUTSTANDING: usize = 10_000;
/// The advisory lock that lets one replica at a time sweep the waiting queue.
const SWEEP_LOCK: i64 = 0x7377_6565_705f_7131;

/// Slot assignment against PostgreSQL and Redis. Cheap to clone.
#[derive(Clone)]
pub struct SlotService {
    pool: PgPool,
    engine: SlotEngine,
    settings: SlotSettings,
    metrics: SlotMetrics,
    /// Background settles under way (bounded by [`SETTLE_MAX_OUTSTANDING`]).
    settling: Arc<AtomicUsize>,
}

impl SlotService {
    pub fn new(
        pool: PgPool,
        engine: SlotEngine,
        settings: SlotSettings,
        metrics: SlotMetrics,
    ) -> Self {
        Self {
            pool,
            engine,
            settings,
            metrics,
            settling: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn engine(&self) -> &SlotEngine {
        &self.engine
    }

    pub fn metrics(&self) -> &SlotMetrics {
        &self.metrics
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn load(&self, id: Uuid) -> Result<Conv, SlotError> {
        let sql = format!("select {CONV_COLUMNS} {CONV_FROM} where c.conversation_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(SlotError::NotFound(id))?;
        conv_from_row(&row)
    }

    /// Several conversations in one read, with whether each one's shop has a slot copy behind
    /// its settings (see `SlotAssigner::sync_shop`). Unknown ids are left out.
    pub async fn load_waiting(&self, ids: &[Uuid]) -> Result<Vec<(Conv, bool)>, SlotError> {
        Self::load_waiting_on(&self.pool, ids).await
    }

    /// [`SlotService::load_waiting`] on a given connection (a batch's transaction sees the
    /// conversations it created).
    async fn load_waiting_on<'c>(
        executor: impl sqlx::PgExecutor<'c>,
        ids: &[Uuid],
    ) -> Result<Vec<(Conv, bool)>, SlotError> {
        let sql = format!(
            "select {CONV_COLUMNS},
                    s.shop_id is not null
                      and (x.synced_version is distinct from s.version
                           or x.synced_refresh is distinct from s.refreshed_at) as shop_behind
             {CONV_FROM}
             left join shop_settings s on s.shop_id = c.shop_id
             left join slot_shops x on x.shop_id = c.shop_id
             where c.conversation_id = any($1)"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(executor)
            .await?;
        rows.iter()
            .map(|row| Ok((conv_from_row(row)?, row.try_get("shop_behind")?)))
            .collect()
    }

    // ----- configuration: PostgreSQL first (the rebuild reads it), then Redis -----

    /// A shop's slot limit changed (or became known). Raising it drains the shop's queue;
    /// lowering it takes nothing away.
    pub async fn set_shop_slots(&self, shop_id: &str, slots: u32) -> Result<u32, SlotError> {
        self.apply_slots(shop_id, slots).await?;
        self.drain_shops(&[shop_id.to_owned()]).await
    }

    /// Writes a shop's slot limit (record, then Redis) without draining.
    pub async fn apply_slots(&self, shop_id: &str, slots: u32) -> Result<(), SlotError> {
        sqlx::query(
            "insert into slot_shops (shop_id, slots) values ($1, $2)
             on conflict (shop_id) do update set slots = excluded.slots, updated_at = now()",
        )
        .bind(shop_id)
        .bind(slots as i32)
        .execute(&self.pool)
        .await?;
        // `false` = Redis needs a rebuild, which reads the record just written.
        self.engine.set_slots(shop_id, slots).await?;
        Ok(())
    }

    /// The Chat permission at a shop was granted or withdrawn (a withdrawn role withdraws it
    /// too). Granting drains the shop's queue; withdrawing first takes the employee out of the
    /// candidates, then hands their open conversations of that shop back to the queue at their
    /// original waiting time.
    pub async fn set_permission(
        &self,
        shop_id: &str,
        employee_id: &str,
        display_name: &str,
        allowed: bool,
    ) -> Result<u32, SlotError> {
        if allowed {
            self.apply_grant(shop_id, employee_id, display_name).await?;
            self.drain_shops(&[shop_id.to_owned()]).await
        } else {
            self.withdraw(shop_id, employee_id).await
        }
    }

    /// Makes the employee a candidate of the shop (record, then Redis) without draining.
    pub async fn apply_grant(
        &self,
        shop_id: &str,
        employee_id: &str,
        display_name: &str,
    ) -> Result<(), SlotError> {
        self.apply_grants(
            shop_id,
            &[(employee_id.to_owned(), display_name.to_owned())],
        )
        .await
    }

    /// Makes each `(employee, display name)` a candidate of the shop without draining: one
    /// statement per table and one Redis call, whatever the number of employees (a shop's sync
    /// runs on every member change of the shop).
    pub async fn apply_grants(
        &self,
        shop_id: &str,
        members: &[(String, String)],
    ) -> Result<(), SlotError> {
        if members.is_empty() {
            return Ok(());
        }
        let (employees, names): (Vec<String>, Vec<String>) = members.iter().cloned().unzip();
        sqlx::query(
            "insert into slot_candidates (shop_id, employee_id)
             select $1, e from unnest($2::text[]) as e
             on conflict do nothing",
        )
        .bind(shop_id)
        .bind(&employees)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            // Writes only on a change: an upsert whose update is skipped still locks the row,
            // and that costs a WAL flush on every config sync.
            // Rows in employee order, so two shops' syncs sharing employees lock in one order.
            "with given as (
                select distinct on (employee_id) employee_id, display_name
                from unnest($1::text[], $2::text[]) with ordinality as g(employee_id, display_name, ord)
                order by employee_id, ord desc
             ), changed as (
                update slot_display_names d set display_name = g.display_name
                from given g
                where d.employee_id = g.employee_id and d.display_name <> g.display_name
             )
             insert into slot_display_names (employee_id, display_name)
             select g.employee_id, g.display_name from given g
             where not exists (select 1 from slot_display_names d where d.employee_id = g.employee_id)
             order by g.employee_id
             on conflict (employee_id) do nothing",
        )
        .bind(&employees)
        .bind(&names)
        .execute(&self.pool)
        .await?;
        self.engine.add_candidates(shop_id, &employees).await?;
        Ok(())
    }

    /// Presence as ShopCtrl reported it; coming back online drains the employee's shops.
    pub async fn set_presence(&self, employee_id: &str, present: bool) -> Result<u32, SlotError> {
        self.apply_presence(employee_id, present).await?;
        // Draining also refreshes the shops' unassigned reasons (e.g. everyone away now).
        self.drain_employee(employee_id).await
    }

    /// Writes presence (record, then Redis) without draining.
    pub async fn apply_presence(&self, employee_id: &str, present: bool) -> Result<(), SlotError> {
        if present {
            sqlx::query("delete from slot_away where employee_id = $1")
                .bind(employee_id)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query("insert into slot_away (employee_id) values ($1) on conflict do nothing")
                .bind(employee_id)
                .execute(&self.pool)
                .await?;
        }
        self.engine.set_present(employee_id, present).await?;
        Ok(())
    }

    /// The employees the slot copy has as candidates of a shop.
    pub async fn candidates(&self, shop_id: &str) -> Result<Vec<String>, SlotError> {
        Ok(sqlx::query_scalar(
            "select employee_id from slot_candidates where shop_id = $1 order by employee_id",
        )
        .bind(shop_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Withdraws the Chat permission (see [`SlotService::set_permission`]).
    pub async fn withdraw_permission(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<u32, SlotError> {
        self.withdraw(shop_id, employee_id).await
    }

    async fn withdraw(&self, shop_id: &str, employee_id: &str) -> Result<u32, SlotError> {
        sqlx::query("delete from slot_candidates where shop_id = $1 and employee_id = $2")
            .bind(shop_id)
            .bind(employee_id)
            .execute(&self.pool)
            .await?;
        // First out of the candidates, so no claim can pick them while we hand back.
        self.engine.remove_candidate(shop_id, employee_id).await?;
        let open: Vec<Uuid> = sqlx::query_scalar(
            "select conversation_id from conversations
             where shop_id = $1 and assignee_employee_id = $2 and state = 'assigned'
             order by waiting_since, conversation_id",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_all(&self.pool)
        .await?;
        for id in open {
            // waiting_since is kept: the conversation goes back at its original place.
            let done = sqlx::query(
                "update conversations
                 set state = 'waiting_for_employee', assignee_employee_id = null,
                     unassigned_reason = 'all_full'
                 where conversation_id = $1 and assignee_employee_id = $2 and state = 'assigned'",
            )
            .bind(id)
            .bind(employee_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if done == 1 {
                self.released(id, shop_id, employee_id, "withdrawn").await?;
            }
        }
        let mut n = self.drain_shops(&[shop_id.to_owned()]).await?;
        n += self.drain_employee(employee_id).await?;
        Ok(n)
    }

    /// Gives back the slot of a conversation that left `employee_id` and logs it.
    async fn released(
        &self,
        id: Uuid,
        shop_id: &str,
        employee_id: &str,
        kind: &str,
    ) -> Result<(), SlotError> {
        let open_after = match self
            .engine
            .release(&id.to_string(), Some(employee_id), ReleaseMode::Close)
            .await?
        {
            ReleaseOutcome::Released { open_after, .. } => open_after as i32,
            // Redis lost it (the rebuild reads PostgreSQL) or never had it: count from the record.
            _ => self.open_count_pg(employee_id).await?,
        };
        sqlx::query(
            "insert into assignment_log
               (conversation_id, shop_id, employee_id, kind, open_count, shop_slots, epoch)
             values ($1, $2, $3, $4, $5,
                     coalesce((select slots from slot_shops where shop_id = $2), 0),
                     (select epoch from slot_epoch where id = 1))",
        )
        .bind(id)
        .bind(shop_id)
        .bind(employee_id)
        .bind(kind)
        .bind(open_after)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn open_count_pg(&self, employee_id: &str) -> Result<i32, SlotError> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from conversations
             where assignee_employee_id = $1 and state = 'assigned'",
        )
        .bind(employee_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as i32)
    }

    // ----- assignment -----

    /// Claims an employee for a conversation waiting for one; idempotent. Returns what the
    /// conversation is now. The shop's waiting conversations get the reason when nobody is
    /// available.
    pub async fn assign_waiting(&self, id: Uuid, kind: ClaimKind) -> Result<Assignment, SlotError> {
        self.assign_loaded(id, None, kind, true).await
    }

    /// [`SlotService::assign_waiting`] with the conversation already read (`loaded`, used for
    /// the first attempt; later attempts read it again). Without `write_reason` a refusal
    /// only answers the reason: the caller writes it ([`SlotService::set_reason`]), once for
    /// many claims of the same shop.
    pub async fn assign_loaded(
        &self,
        id: Uuid,
        mut loaded: Option<Conv>,
        kind: ClaimKind,
        write_reason: bool,
    ) -> Result<Assignment, SlotError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let conv = match loaded.take() {
                Some(conv) => conv,
                None => self.load(id).await?,
            };
            if conv.state != "waiting_for_employee" {
                return Ok(match (conv.state.as_str(), conv.assignee) {
                    ("assigned", Some(employee_id)) => Assignment::Assigned { employee_id },
                    (state, _) => Assignment::NotWaiting {
                        state: state.to_owned(),
                    },
                });
            }
            let cid = id.to_string();
            match self
                .engine
                .claim(&cid, &conv.shop_id, &conv.customer_id)
                .await?
            {
                ClaimOutcome::Rebuild => self.ensure_rebuilt().await?,
                ClaimOutcome::Unassigned { reason, .. } => {
                    if write_reason {
                        self.set_reason(&conv.shop_id, reason).await?;
                    }
                    return Ok(Assignment::Waiting { reason });
                }
                ClaimOutcome::Existing {
                    employee_id,
                    pending,
                    ..
                } => {
                    if pending {
                        // Another attempt's claim; it commits or expires shortly.
                        return Err(SlotError::Busy);
                    }
                    // Redis says committed. Either someone committed it since we read the
                    // record (then the next round sees it assigned), or the record says
                    // waiting (a hand-back or close whose release did not run yet): the
                    // record wins.
                    if self.load(id).await?.state == "waiting_for_employee" {
                        self.engine
                            .release(&cid, Some(&employee_id), ReleaseMode::Close)
                            .await?;
                    }
                }
                ClaimOutcome::Claimed(claim) => {
                    match self
                        .commit(&conv, &claim, kind.as_str(), false, None)
                        .await?
                    {
                        Committed::Yes => {
                            return Ok(Assignment::Assigned {
                                employee_id: claim.employee_id,
                            });
                        }
                        Committed::Fenced => self.ensure_rebuilt().await?,
                        Committed::Lost => {}
                    }
                }
            }
        }
        Err(SlotError::Rebuilding)
    }

    /// Automatic claims for several waiting conversations at once (a shard's batch). The
    /// claims run concurrently in Redis, and every claim taken is recorded in one statement,
    /// so the batch pays one commit for its assignments instead of one each. Anything off
    /// that path (no conversation read yet, one that came through a handover, a claim already
    /// present, a rebuild, a commit fenced or lost) goes through
    /// [`SlotService::assign_loaded`] on its own. A refusal only answers the reason (see
    /// `write_reason` there). Returns each conversation's result.
    pub async fn assign_many(
        &self,
        convs: Vec<(Uuid, Option<Conv>, tracing::Span)>,
        kind: ClaimKind,
    ) -> Vec<(Uuid, Result<Assignment, SlotError>)> {
        let mut results = Vec::with_capacity(convs.len());
        let mut single = Vec::new();
        let mut simple = Vec::new();
        for (id, conv, span) in convs {
            match conv {
                Some(conv) if conv.claimable_in_bulk() => simple.push((conv, span)),
                conv => single.push((id, conv, span)),
            }
        }
        let mut taken = Vec::new();
        for (conv, span, outcome) in self.claim_each(simple).await {
            match outcome {
                Ok(ClaimOutcome::Claimed(claim)) => taken.push((conv, span, claim)),
                Ok(ClaimOutcome::Unassigned { reason, .. }) => {
                    results.push((conv.id, Ok(Assignment::Waiting { reason })));
                }
                Ok(ClaimOutcome::Rebuild | ClaimOutcome::Existing { .. }) => {
                    single.push((conv.id, None, span));
                }
                Err(error) => results.push((conv.id, Err(error))),
            }
        }
        let recorded = if taken.is_empty() {
            HashSet::new()
        } else {
            match Self::commit_claims_on(&self.pool, &taken, kind).await {
                Ok(ids) => ids,
                Err(error) => {
                    // The statement's answer may be lost while it committed: a second later
                    // the record says which. Until then the claims are in flight (busy).
                    tracing::warn!(%error, claims = taken.len(), "recording a batch of claims failed");
                    for (conv, _, claim) in std::mem::take(&mut taken) {
                        results.push((conv.id, Err(SlotError::Busy)));
                        self.settle_in_background(conv, claim.employee_id, Duration::from_secs(1));
                    }
                    HashSet::new()
                }
            }
        };
        if !taken.is_empty() {
            let settled = taken.into_iter().map(|(conv, span, claim)| {
                let recorded = recorded.contains(&conv.id);
                let inner = span.clone();
                async move {
                    // Not recorded (fenced, lost or not written): then the conversation is
                    // tried on its own.
                    let result = self.finish_claim(&conv, &claim, recorded).await.map(|r| {
                        r.map(|_| Assignment::Assigned {
                            employee_id: claim.employee_id.clone(),
                        })
                    });
                    (conv.id, result, span)
                }
                .instrument(inner)
            });
            let settled: Vec<_> = futures::stream::iter(settled)
                .buffer_unordered(CONCURRENT_CLAIMS)
                .collect()
                .await;
            for (id, result, span) in settled {
                match result {
                    Some(result) => results.push((id, result)),
                    None => single.push((id, None, span)),
                }
            }
        }
        let one_by_one: Vec<_> =
            futures::stream::iter(single.into_iter().map(|(id, conv, span)| {
                async move { (id, self.assign_loaded(id, conv, kind, false).await) }
                    .instrument(span)
            }))
            .buffer_unordered(CONCURRENT_CLAIMS)
            .collect()
            .await;
        results.extend(one_by_one);
        results
    }

    /// Automatic claims for waiting conversations, recorded in the caller's transaction
    /// (`conn`, not committed yet), so they commit together with the batch that created the
    /// conversations: one commit, and no second transaction to wait for. Only the common case
    /// is taken here: a conversation waiting for an employee, not from a handover, whose
    /// shop's slot copy is current, and a claim that succeeds. The rest is left for the
    /// caller's usual path after the commit ([`SlotService::assign_many`]), refusals too:
    /// capacity that appears before the commit drains from the record, which cannot see
    /// these conversations yet, so only a claim after the commit is sure to see it. On an
    /// error no claim is left behind in Redis. [`BatchClaims::settle`] must run once the
    /// transaction has ended.
    pub async fn claim_in_batch(
        &self,
        conn: &mut sqlx::PgConnection,
        waiting: &[(Uuid, tracing::Span)],
    ) -> Result<BatchClaims, SlotError> {
        let ids: Vec<Uuid> = waiting.iter().map(|(id, _)| *id).collect();
        let loaded = Self::load_waiting_on(&mut *conn, &ids).await?;
        let spans: std::collections::HashMap<Uuid, tracing::Span> =
            waiting.iter().cloned().collect();
        let simple: Vec<(Conv, tracing::Span)> = loaded
            .into_iter()
            .filter(|(conv, behind)| !behind && conv.claimable_in_bulk())
            .map(|(conv, _)| {
                let span = spans.get(&conv.id).cloned();
                (conv, span.unwrap_or_else(tracing::Span::none))
            })
            .collect();
        let claims = self.claim_each(simple).await;
        let mut batch = BatchClaims {
            svc: self.clone(),
            taken: Vec::new(),
            recorded: HashSet::new(),
        };
        for (conv, span, outcome) in claims {
            // Refused, a rebuild, a claim already present, Redis unreachable: after the
            // commit.
            if let Ok(ClaimOutcome::Claimed(claim)) = outcome {
                batch.taken.push((conv, span, claim));
            }
        }
        if !batch.taken.is_empty() {
            match Self::commit_claims_on(&mut *conn, &batch.taken, ClaimKind::Auto).await {
                Ok(recorded) => batch.recorded = recorded,
                Err(error) => {
                    batch.give_back().await;
                    return Err(error);
                }
            }
        }
        Ok(batch)
    }

    /// The automatic claim script for each conversation, several at a time, each in its
    /// event's span.
    async fn claim_each(
        &self,
        convs: Vec<(Conv, tracing::Span)>,
    ) -> Vec<(Conv, tracing::Span, Result<ClaimOutcome, SlotError>)> {
        futures::stream::iter(convs.into_iter().map(|(conv, span)| {
            let inner = span.clone();
            async move {
                let outcome = self
                    .engine
                    .claim(&conv.id.to_string(), &conv.shop_id, &conv.customer_id)
                    .await;
                (conv, span, outcome)
            }
            .instrument(inner)
        }))
        .buffer_unordered(CONCURRENT_CLAIMS)
        .collect()
        .await
    }

    /// After the statement that recorded claims: confirms a recorded claim in Redis (its
    /// result), or lets the record settle one that was not recorded (`None`; best effort,
    /// the pending marker expires anyway).
    async fn finish_claim(
        &self,
        conv: &Conv,
        claim: &Claimed,
        recorded: bool,
    ) -> Option<Result<ConfirmOutcome, SlotError>> {
        if recorded {
            return Some(self.confirm_committed(conv, &claim.employee_id).await);
        }
        let _ = self.settle(conv, &claim.employee_id).await;
        None
    }

    /// Confirms in Redis a claim PostgreSQL has committed. If Redis cannot be told now, the
    /// assignment stands but Redis would stop counting it once the pending marker expires
    /// (and the employee could be given one conversation too many), so the record is asked
    /// again and Redis told in the background until that lands.
    async fn confirm_committed(
        &self,
        conv: &Conv,
        employee: &str,
    ) -> Result<ConfirmOutcome, SlotError> {
        let result = self
            .engine
            .confirm(&conv.id.to_string(), employee, &conv.shop_id)
            .await;
        if let Err(error) = &result {
            tracing::warn!(conversation = %conv.id, employee, %error,
                "cannot confirm a committed claim in Redis; retrying in the background");
            self.settle_in_background(
                conv.clone(),
                employee.to_owned(),
                Duration::from_millis(250),
            );
        }
        result
    }

    /// Settles a claim after `first_wait`, retried with backoff while Redis or the database
    /// cannot be reached, for about a minute; the drift check repairs whatever is still off
    /// by then. Giving the claim back is allowed only in the first half of its pending life:
    /// later the claim may have expired and the conversation been claimed again (often for
    /// the same employee), and a rollback would take that newer claim. An expired claim needs
    /// no giving back anyway.
    fn settle_in_background(&self, conv: Conv, employee: String, first_wait: Duration) {
        if self.settling.fetch_add(1, Ordering::SeqCst) >= SETTLE_MAX_OUTSTANDING {
            self.settling.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(conversation = %conv.id, %employee,
                "too many claims waiting to be settled; leaving this one to expire and to the drift check");
            return;
        }
        let svc = self.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let started = tokio::time::Instant::now();
                let release_until = started + svc.engine.pending_ttl() / 2;
                let mut wait = first_wait;
                loop {
                    tokio::time::sleep(wait).await;
                    let may_release = tokio::time::Instant::now() < release_until;
                    match svc.settle_checked(&conv, &employee, may_release).await {
                        Ok(()) => break,
                        Err(error) if started.elapsed() < SETTLE_FOR => {
                            tracing::debug!(conversation = %conv.id, %employee, %error, "settling a claim failed; retrying");
                        }
                        Err(error) => {
                            tracing::warn!(conversation = %conv.id, %employee, %error,
                                "gave up settling a claim in Redis; the drift check will repair the count");
                            break;
                        }
                    }
                    wait = (wait * 2).min(SETTLE_WAIT_CAP);
                }
                svc.settling.fetch_sub(1, Ordering::SeqCst);
            }
            .instrument(span),
        );
    }

    /// Records automatic claims in one statement (so in one transaction), fenced on the epoch
    /// like [`SlotService::commit`]. Returns the conversations recorded; the others were
    /// fenced (claimed under an older epoch) or lost (taken or closed meanwhile).
    async fn commit_claims_on<'c>(
        executor: impl sqlx::PgExecutor<'c>,
        taken: &[(Conv, tracing::Span, Claimed)],
        kind: ClaimKind,
    ) -> Result<HashSet<Uuid>, SlotError> {
        let ids: Vec<Uuid> = taken.iter().map(|(c, _, _)| c.id).collect();
        let employees: Vec<&str> = taken
            .iter()
            .map(|(_, _, k)| k.employee_id.as_str())
            .collect();
        let customers: Vec<&str> = taken
            .iter()
            .map(|(c, _, _)| c.customer_id.as_str())
            .collect();
        let open: Vec<i32> = taken.iter().map(|(_, _, k)| k.open_before as i32).collect();
        let slots: Vec<i32> = taken.iter().map(|(_, _, k)| k.slots as i32).collect();
        let epochs: Vec<i64> = taken.iter().map(|(_, _, k)| k.epoch).collect();
        // The fence is read `for share` inside the statement, so a rebuild (which bumps it)
        // waits for this commit and then reads what it recorded. The log's time is when the
        // statement ran: in a batch's transaction `now()` would be the batch's start.
        let recorded: Vec<Uuid> = sqlx::query_scalar(
            "with fence as (select epoch from slot_epoch where id = 1 for share),
             claim as (
               select * from unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::int[],
                                    $6::bigint[])
                 as t(conversation_id, employee_id, customer_id, open_count, shop_slots, epoch)),
             taken as (
               update conversations c
               set state = 'assigned', assignee_employee_id = k.employee_id,
                   unassigned_reason = null
               from claim k, fence f
               where c.conversation_id = k.conversation_id and k.epoch = f.epoch
                 and c.state = 'waiting_for_employee'
                 and c.assignee_employee_id is distinct from k.employee_id
               returning c.conversation_id, c.shop_id, k.employee_id, k.customer_id,
                         k.open_count, k.shop_slots, k.epoch),
             logged as (
               insert into assignment_log (conversation_id, shop_id, employee_id, kind,
                                           open_count, shop_slots, over_limit, epoch,
                                           created_at)
               select conversation_id, shop_id, employee_id, $7, open_count, shop_slots,
                      open_count >= shop_slots, epoch, clock_timestamp()
               from taken),
             served as (
               insert into slot_last_served (shop_id, customer_id, employee_id)
               select distinct on (shop_id, customer_id) shop_id, customer_id, employee_id
               from taken order by shop_id, customer_id, conversation_id
               on conflict (shop_id, customer_id)
               do update set employee_id = excluded.employee_id, served_at = now())
             select conversation_id from taken",
        )
        .bind(&ids)
        .bind(&employees)
        .bind(&customers)
        .bind(&open)
        .bind(&slots)
        .bind(&epochs)
        .bind(kind.as_str())
        .fetch_all(executor)
        .await?;
        Ok(recorded.into_iter().collect())
    }

    /// Records a pending claim in PostgreSQL (fenced on the epoch) and confirms it in Redis;
    /// on failure gives the slot back.
    async fn commit(
        &self,
        conv: &Conv,
        claim: &Claimed,
        kind: &str,
        manual: bool,
        previous: Option<&str>,
    ) -> Result<Committed, SlotError> {
        let employee = claim.employee_id.as_str();
        let result = self
            .commit_tx(conv, claim, kind, manual, previous.is_some())
            .await;
        match result {
            Ok(Committed::Yes) => {
                // If Redis lost its data meanwhile, the rebuild read this commit.
                self.confirm_committed(conv, employee).await?;
                if let Some(previous) = previous.filter(|p| *p != employee) {
                    let open_after = self.open_count_redis(previous).await?;
                    self.log_plain(conv, previous, "released", open_after, claim)
                        .await?;
                }
                Ok(Committed::Yes)
            }
            Ok(other) => {
                self.settle(conv, employee).await?;
                Ok(other)
            }
            Err(error) => {
                // The commit's answer may have been lost while the commit went through: a
                // second later the record says which (as for a batch's claims).
                self.settle_in_background(
                    conv.clone(),
                    employee.to_owned(),
                    Duration::from_secs(1),
                );
                Err(error)
            }
        }
    }

    /// After a commit that did not happen: the record decides whether the claim stays.
    pub(crate) async fn settle(&self, conv: &Conv, employee: &str) -> Result<(), SlotError> {
        self.settle_checked(conv, employee, true).await
    }

    /// Tells Redis what the record says about this claim. The row is read `for share` and held
    /// across the Redis call, so a close or transfer committing meanwhile is ordered after it
    /// (and its own Redis update comes after this one), never undone by a stale confirm.
    async fn settle_checked(
        &self,
        conv: &Conv,
        employee: &str,
        may_release: bool,
    ) -> Result<(), SlotError> {
        let cid = conv.id.to_string();
        let mut tx = self.pool.begin().await?;
        let now: Option<(String, Option<String>)> = sqlx::query_as(
            "select state, assignee_employee_id from conversations
             where conversation_id = $1 for share",
        )
        .bind(conv.id)
        .fetch_optional(&mut *tx)
        .await?;
        match now {
            // Committed for this employee: make sure Redis counts it.
            Some((state, Some(assignee))) if state == "assigned" && assignee == employee => {
                self.engine.confirm(&cid, employee, &conv.shop_id).await?;
            }
            _ if may_release => {
                self.engine
                    .release(&cid, Some(employee), ReleaseMode::Rollback)
                    .await?;
            }
            // Too late to give back safely; the claim has expired or is about to.
            _ => {}
        }
        tx.commit().await?;
        Ok(())
    }

    async fn commit_tx(
        &self,
        conv: &Conv,
        claim: &Claimed,
        kind: &str,
        manual: bool,
        transfer: bool,
    ) -> Result<Committed, SlotError> {
        let mut tx = self.pool.begin().await?;
        let epoch: i64 = sqlx::query_scalar("select epoch from slot_epoch where id = 1 for share")
            .fetch_one(&mut *tx)
            .await?;
        if epoch != claim.epoch {
            tx.rollback().await?;
            return Ok(Committed::Fenced);
        }
        let states: &[&str] = if manual {
            &["waiting_for_employee", "waiting_for_handover", "assigned"]
        } else {
            &["waiting_for_employee"]
        };
        let updated = sqlx::query(
            "update conversations
             set state = 'assigned', assignee_employee_id = $2, unassigned_reason = null
             where conversation_id = $1 and state = any($3)
               and assignee_employee_id is distinct from $2
               and ($4 or assignee_employee_id is null)",
        )
        .bind(conv.id)
        .bind(&claim.employee_id)
        .bind(states)
        .bind(transfer || !manual)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(Committed::Lost);
        }
        let over = claim.open_before >= claim.slots;
        sqlx::query(
            "insert into assignment_log
               (conversation_id, shop_id, employee_id, kind, open_count, shop_slots, over_limit, epoch)
             values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(conv.id)
        .bind(&conv.shop_id)
        .bind(&claim.employee_id)
        .bind(kind)
        .bind(claim.open_before as i32)
        .bind(claim.slots as i32)
        .bind(over)
        .bind(epoch)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into slot_last_served (shop_id, customer_id, employee_id) values ($1, $2, $3)
             on conflict (shop_id, customer_id)
             do update set employee_id = excluded.employee_id, served_at = now()",
        )
        .bind(&conv.shop_id)
        .bind(&conv.customer_id)
        .bind(&claim.employee_id)
        .execute(&mut *tx)
        .await?;
        if conv.via_handover {
            let name = self.display_name(&mut tx, &claim.employee_id).await?;
            let outcome = pb::flow_event::Outcome::Assigned(pb::FlowEmployeeAssigned {
                employee_id: claim.employee_id.clone(),
                display_name: name,
                from_queue: kind != "handover",
            });
            self.flow_event(&mut tx, conv, outcome).await?;
        }
        tx.commit().await?;
        Ok(Committed::Yes)
    }

    async fn log_plain(
        &self,
        conv: &Conv,
        employee: &str,
        kind: &str,
        open_count: i32,
        claim: &Claimed,
    ) -> Result<(), SlotError> {
        sqlx::query(
            "insert into assignment_log
               (conversation_id, shop_id, employee_id, kind, open_count, shop_slots, epoch)
             values ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(conv.id)
        .bind(&conv.shop_id)
        .bind(employee)
        .bind(kind)
        .bind(open_count)
        .bind(claim.slots as i32)
        .bind(claim.epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn open_count_redis(&self, employee: &str) -> Result<i32, SlotError> {
        Ok(match self.engine.inspect(employee).await? {
            Some(state) => (state.open.len() as u32 + state.live_pending) as i32,
            None => self.open_count_pg(employee).await?,
        })
    }

    async fn display_name(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        employee: &str,
    ) -> Result<String, SlotError> {
        let name: Option<String> = sqlx::query_scalar(
            "select display_name from slot_display_names where employee_id = $1",
        )
        .bind(employee)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(name.unwrap_or_default())
    }

    async fn flow_event(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        conv: &Conv,
        outcome: pb::flow_event::Outcome,
    ) -> Result<(), SlotError> {
        let event_id = Uuid::now_v7();
        let now = chrono::Utc::now();
        let event = pb::FlowEvent {
            meta: Some(pb::EventMeta {
                event_id: event_id.to_string(),
                occurred_at: Some(prost_types::Timestamp {
                    seconds: now.timestamp(),
                    nanos: now.timestamp_subsec_nanos() as i32,
                }),
                producer: "routing".to_owned(),
            }),
            shop_id: conv.shop_id.clone(),
            conversation_id: conv.id.to_string(),
            messagebird_conversation_id: conv.messagebird_conversation_id.clone(),
            contact: Some(conv.contact.clone()),
            outcome: Some(outcome),
        };
        outbox_enqueue(
            tx,
            &OutboxMessage {
                event_id,
                exchange: self.settings.flow_exchange.clone(),
                routing_key: "flow".to_owned(),
                message_type: "shopctrl.messaging.v1.FlowEvent".to_owned(),
                payload: event.encode_to_vec(),
                headers: Vec::new(),
            },
        )
        .await?;
        Ok(())
    }

    /// Every waiting conversation of the shop carries the same reason: availability is a
    /// property of the shop, not of the conversation. So the reason is one row per shop
    /// (read through [`crate::store::UNASSIGNED_REASON_SQL`]), written only when it changes, instead of a
    /// rewrite of the whole queue after every refused claim.
    pub async fn set_reason(
        &self,
        shop_id: &str,
        reason: UnassignedReason,
    ) -> Result<(), SlotError> {
        // Writes only when the reason changed: an upsert whose update is skipped still locks
        // the row, which costs a transaction id and a WAL flush on every refused claim.
        sqlx::query(
            "with changed as (
                update shop_waiting_reasons set reason = $2, updated_at = now()
                where shop_id = $1 and reason <> $2
             )
             insert into shop_waiting_reasons (shop_id, reason)
             select $1, $2
             where not exists (select 1 from shop_waiting_reasons where shop_id = $1)
             on conflict (shop_id) do nothing",
        )
        .bind(shop_id)
        .bind(reason.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// 1-based position in the shop's queue (oldest first).
    pub async fn queue_position(&self, id: Uuid) -> Result<u32, SlotError> {
        let mut conn = self.pool.acquire().await?;
        Ok(crate::store::queue_position(&mut conn, id).await?)
    }

    /// A flow's handover request for an existing conversation (unknown ones are created as
    /// waiting for the handover by the caller; closed ones resolved by the closed-conversation
    /// setting first). The first request moves the conversation to the queue and claims;
    /// repeated requests change nothing and only re-emit the current result as a flow event.
    pub async fn handover(&self, id: Uuid) -> Result<HandoverOutcome, SlotError> {
        let conv = self.load(id).await?;
        match conv.state.as_str() {
            "closed" => return Err(SlotError::Closed(id)),
            "waiting_for_handover" => {
                sqlx::query(
                    "update conversations
                     set state = 'waiting_for_employee', via_handover = true,
                         waiting_since = coalesce(waiting_since, now()),
                         unassigned_reason = null
                     where conversation_id = $1 and state = 'waiting_for_handover'",
                )
                .bind(id)
                .execute(&self.pool)
                .await?;
                match self.assign_waiting(id, ClaimKind::Handover).await? {
                    // The commit queued the "assigned" flow event.
                    Assignment::Assigned { employee_id } => {
                        return Ok(HandoverOutcome::Assigned { employee_id });
                    }
                    Assignment::Waiting { .. } | Assignment::NotWaiting { .. } => {}
                }
            }
            _ => {
                if !conv.via_handover {
                    sqlx::query(
                        "update conversations set via_handover = true where conversation_id = $1",
                    )
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        self.emit_current(id).await
    }

    /// Queues a flow event with the conversation's current result.
    async fn emit_current(&self, id: Uuid) -> Result<HandoverOutcome, SlotError> {
        let conv = self.load(id).await?;
        let mut tx = self.pool.begin().await?;
        let (outcome, result) = match (conv.state.as_str(), &conv.assignee) {
            ("assigned", Some(employee_id)) => {
                let name = self.display_name(&mut tx, employee_id).await?;
                (
                    pb::flow_event::Outcome::Assigned(pb::FlowEmployeeAssigned {
                        employee_id: employee_id.clone(),
                        display_name: name,
                        from_queue: false,
                    }),
                    HandoverOutcome::Assigned {
                        employee_id: employee_id.clone(),
                    },
                )
            }
            ("closed", _) => return Err(SlotError::Closed(id)),
            _ => {
                let reason = conv
                    .unassigned_reason
                    .as_deref()
                    .and_then(UnassignedReason::parse)
                    .unwrap_or(UnassignedReason::AllFull);
                let position = self.queue_position(id).await?;
                (
                    pb::flow_event::Outcome::Waiting(pb::FlowNoEmployeeAvailable {
                        queue_position: position,
                        reason: reason.to_proto() as i32,
                    }),
                    HandoverOutcome::Waiting { position, reason },
                )
            }
        };
        self.flow_event(&mut tx, &conv, outcome).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// Manual assignment or transfer through the agent API: to an employee with the Chat
    /// permission at the shop, taking a slot atomically; over the limit only with `force`
    /// (recorded as forced and counted).
    pub async fn manual_assign(
        &self,
        id: Uuid,
        employee_id: &str,
        force: bool,
    ) -> Result<(String, bool), SlotError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let conv = self.load(id).await?;
            if conv.state == "closed" {
                return Err(SlotError::Closed(id));
            }
            if conv.assignee.as_deref() == Some(employee_id) {
                return Ok((employee_id.to_owned(), false));
            }
            let cid = id.to_string();
            match self
                .engine
                .assign(&cid, &conv.shop_id, employee_id, force, &conv.customer_id)
                .await?
            {
                AssignOutcome::Rebuild => self.ensure_rebuilt().await?,
                AssignOutcome::NoPermission => return Err(SlotError::NoPermission),
                AssignOutcome::Full { open, slots } => {
                    return Err(SlotError::NoFreeSlot { open, slots });
                }
                AssignOutcome::Busy { .. } => return Err(SlotError::Busy),
                AssignOutcome::Existing { .. } => {
                    // Redis already has them as owner: either committed since we read the
                    // record (the next round sees it), or the record disagrees and wins.
                    if self.load(id).await?.assignee.as_deref() != Some(employee_id) {
                        self.engine
                            .release(&cid, Some(employee_id), ReleaseMode::Close)
                            .await?;
                    }
                }
                AssignOutcome::Claimed {
                    claim,
                    over_limit,
                    previous,
                } => {
                    let kind = if over_limit { "forced" } else { "manual" };
                    let previous = previous.or(conv.assignee.clone());
                    match self
                        .commit(&conv, &claim, kind, true, previous.as_deref())
                        .await?
                    {
                        Committed::Yes => {
                            if over_limit {
                                self.metrics.forced.inc();
                            }
                            if let Some(previous) = previous.filter(|p| p != employee_id) {
                                self.drain_employee(&previous).await?;
                            }
                            return Ok((claim.employee_id, over_limit));
                        }
                        Committed::Fenced => self.ensure_rebuilt().await?,
                        Committed::Lost => {}
                    }
                }
            }
        }
        Err(SlotError::Busy)
    }

    /// A conversation was closed in the record (by whoever closes it): its slot is given back
    /// and the employee's queues drained.
    pub async fn conversation_closed(&self, id: Uuid) -> Result<u32, SlotError> {
        let row: Option<String> =
            sqlx::query_scalar("select shop_id from conversations where conversation_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(shop_id) = row else {
            return Err(SlotError::NotFound(id));
        };
        match self
            .engine
            .release(&id.to_string(), None, ReleaseMode::Close)
            .await?
        {
            ReleaseOutcome::Released {
                employee_id,
                open_after,
            } => {
                sqlx::query(
                    "insert into assignment_log
                       (conversation_id, shop_id, employee_id, kind, open_count, shop_slots, epoch)
                     values ($1, $2, $3, 'closed', $4,
                             coalesce((select slots from slot_shops where shop_id = $2), 0),
                             (select epoch from slot_epoch where id = 1))",
                )
                .bind(id)
                .bind(&shop_id)
                .bind(&employee_id)
                .bind(open_after as i32)
                .execute(&self.pool)
                .await?;
                self.drain_employee(&employee_id).await
            }
            ReleaseOutcome::Rebuild => {
                self.ensure_rebuilt().await?;
                Ok(0)
            }
            _ => Ok(0),
        }
    }

    /// Capacity may have appeared for `employee_id` because the record took conversations
    /// from them (closed, transferred): gives back the slots Redis still counts for
    /// conversations the record no longer has assigned to them, then drains their queues.
    /// Safe against claims in flight: pending claims are not in the committed set, and a
    /// release only touches a conversation Redis has committed to this employee.
    pub async fn employee_freed(&self, employee_id: &str) -> Result<u32, SlotError> {
        let state = match self.engine.inspect(employee_id).await? {
            Some(state) => state,
            None => {
                self.ensure_rebuilt().await?;
                return self.drain_employee(employee_id).await;
            }
        };
        let ids: Vec<Uuid> = state
            .open
            .iter()
            .filter_map(|c| Uuid::parse_str(c).ok())
            .collect();
        if !ids.is_empty() {
            let rows: Vec<(Uuid, String, String, Option<String>)> = sqlx::query_as(
                "select conversation_id, shop_id, state, assignee_employee_id from conversations
                 where conversation_id = any($1)",
            )
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
            for (id, shop_id, state, assignee) in rows {
                if assignee.as_deref() != Some(employee_id) {
                    let kind = if state == "closed" {
                        "closed"
                    } else {
                        "released"
                    };
                    self.released(id, &shop_id, employee_id, kind).await?;
                }
            }
        }
        self.drain_employee(employee_id).await
    }

    // ----- the waiting queue -----

    /// Capacity may have appeared for `employee_id`: claims the waiting conversations of all
    /// their shops, oldest first across those shops, until nothing more can be assigned.
    pub async fn drain_employee(&self, employee_id: &str) -> Result<u32, SlotError> {
        let shops: Vec<String> = sqlx::query_scalar(
            "select shop_id from slot_candidates where employee_id = $1 order by shop_id",
        )
        .bind(employee_id)
        .fetch_all(&self.pool)
        .await?;
        self.drain_shops(&shops).await
    }

    /// Claims the waiting conversations of these shops, oldest first across them. A shop whose
    /// oldest conversation finds nobody is done: availability is the same for all its
    /// conversations.
    pub async fn drain_shops(&self, shops: &[String]) -> Result<u32, SlotError> {
        let mut open: Vec<String> = shops.to_vec();
        let mut skipped: Vec<Uuid> = Vec::new();
        let mut assigned = 0;
        for _ in 0..DRAIN_LIMIT {
            if open.is_empty() {
                break;
            }
            let next: Option<(Uuid, String)> = sqlx::query_as(
                "select conversation_id, shop_id from conversations
                 where shop_id = any($1) and state = 'waiting_for_employee'
                   and conversation_id <> all($2)
                 order by waiting_since, conversation_id limit 1",
            )
            .bind(&open)
            .bind(&skipped)
            .fetch_optional(&self.pool)
            .await?;
            let Some((id, shop)) = next else { break };
            match self.assign_waiting(id, ClaimKind::Queue).await {
                Ok(Assignment::Assigned { .. }) => assigned += 1,
                Ok(Assignment::Waiting { .. }) => open.retain(|s| *s != shop),
                Ok(Assignment::NotWaiting { .. }) => {}
                // Another replica's claim on it is in flight: it is being taken care of.
                Err(SlotError::Busy) => skipped.push(id),
                Err(error) => return Err(error),
            }
        }
        Ok(assigned)
    }

    // ----- Redis is a cache of the record -----

    /// Makes sure Redis holds the slot data: returns at once when it does, rebuilds it when we
    /// get the lease, waits for another replica's rebuild otherwise.
    pub async fn ensure_rebuilt(&self) -> Result<(), SlotError> {
        let token = Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + self.settings.rebuild_wait;
        loop {
            match self
                .engine
                .rebuild_begin(&token, self.settings.rebuild_lease)
                .await?
            {
                RebuildStart::Done => return Ok(()),
                RebuildStart::Lease => match self.rebuild(&token).await {
                    Ok(()) => {
                        self.metrics.rebuilds.inc();
                        return Ok(());
                    }
                    Err(SlotError::LeaseLost) => {}
                    Err(error) => return Err(error),
                },
                RebuildStart::Busy => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SlotError::Rebuilding);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn rebuild(&self, token: &str) -> Result<(), SlotError> {
        tracing::warn!("slot data missing in Redis: rebuilding it from PostgreSQL");
        self.engine.clear_for_rebuild().await?;
        let mut tx = self.pool.begin().await?;
        // The rebuild reads whole tables (the stickiness, the log's idle order): routing's
        // sessions avoid sequential scans, which would make these walk a whole index row by
        // row while claim commits wait on the epoch row this transaction updates.
        sqlx::query("set local enable_seqscan = on")
            .execute(&mut *tx)
            .await?;
        // Waits for assignment commits in flight (they hold the row `for share`); later ones
        // see the new epoch and are refused, so this read misses no commit.
        let epoch: i64 = sqlx::query_scalar(
            "update slot_epoch set epoch = epoch + 1 where id = 1 returning epoch",
        )
        .fetch_one(&mut *tx)
        .await?;
        let shops: Vec<(String, i32)> = sqlx::query_as(
            "select s.shop_id, coalesce(x.slots, 0)
             from (select shop_id from slot_shops union select shop_id from slot_candidates) s
             left join slot_shops x on x.shop_id = s.shop_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let candidates: Vec<(String, String)> =
            sqlx::query_as("select shop_id, employee_id from slot_candidates order by shop_id")
                .fetch_all(&mut *tx)
                .await?;
        let away: Vec<String> = sqlx::query_scalar("select employee_id from slot_away")
            .fetch_all(&mut *tx)
            .await?;
        let open: Vec<(String, String, String)> = sqlx::query_as(
            "select assignee_employee_id, conversation_id::text, shop_id from conversations
             where state = 'assigned' and assignee_employee_id is not null
             order by assignee_employee_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let last: Vec<(String, String, String)> = sqlx::query_as(
            "select shop_id, customer_id, employee_id from slot_last_served order by shop_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        // The idle order: by each employee's latest claim or close in the log.
        let idle: Vec<String> = sqlx::query_scalar(
            "select employee_id from assignment_log
             where kind in ('auto', 'handover', 'queue', 'manual', 'forced', 'closed', 'withdrawn')
             group by employee_id order by max(assignment_id)",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        for (shop, slots) in &shops {
            let slots = slots.to_string();
            let mut args: Vec<&str> = vec![shop, &slots];
            args.extend(
                candidates
                    .iter()
                    .filter(|(s, _)| s == shop)
                    .map(|(_, e)| e.as_str()),
            );
            self.engine.rebuild_step(token, "shop", &args).await?;
        }
        for chunk in away.chunks(500) {
            let args: Vec<&str> = chunk.iter().map(String::as_str).collect();
            self.engine.rebuild_step(token, "away", &args).await?;
        }
        for group in open.chunk_by(|a, b| a.0 == b.0) {
            for chunk in group.chunks(250) {
                let mut args: Vec<&str> = vec![&chunk[0].0];
                for (_, conversation, shop) in chunk {
                    args.push(conversation);
                    args.push(shop);
                }
                self.engine.rebuild_step(token, "open", &args).await?;
            }
        }
        for group in last.chunk_by(|a, b| a.0 == b.0) {
            for chunk in group.chunks(250) {
                let mut args: Vec<&str> = vec![&chunk[0].0];
                for (_, customer, employee) in chunk {
                    args.push(customer);
                    args.push(employee);
                }
                self.engine.rebuild_step(token, "last", &args).await?;
            }
        }
        // Negative ranks: after every stamp handed out later, before anyone never assigned.
        let n = idle.len() as i64;
        let ranks: Vec<String> = (1..=n).map(|i| (i - n - 1).to_string()).collect();
        for (employees, stamps) in idle.chunks(250).zip(ranks.chunks(250)) {
            let mut args: Vec<&str> = Vec::new();
            for (employee, stamp) in employees.iter().zip(stamps) {
                args.push(employee);
                args.push(stamp);
            }
            self.engine.rebuild_step(token, "idle", &args).await?;
        }
        self.engine
            .rebuild_step(token, "finish", &[&epoch.to_string()])
            .await?;
        tracing::info!(epoch, "slot data rebuilt from PostgreSQL");
        Ok(())
    }

    /// Compares each employee's committed conversations in Redis with the record and repairs
    /// differences, skipping employees with claims in flight. Returns how many were repaired.
    ///
    /// Drift can only be about someone with open conversations in the record or a state in
    /// Redis, so those are the employees checked: both sets are bounded by the staff and
    /// today's open conversations, where the assignment log only ever grows.
    pub async fn check_drift(&self) -> Result<u32, SlotError> {
        self.ensure_rebuilt().await?;
        let mut employees: BTreeSet<String> = sqlx::query_scalar::<_, String>(
            "select distinct assignee_employee_id from conversations
             where state = 'assigned' and assignee_employee_id is not null",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        employees.extend(self.engine.known_employees().await?);
        let mut repaired = 0;
        for employee in employees {
            // Redis first: a claim after this read changes the version and voids the repair.
            let Some(state) = self.engine.inspect(&employee).await? else {
                return Err(SlotError::Rebuilding);
            };
            if state.live_pending > 0 {
                continue;
            }
            let record: Vec<(String, String)> = sqlx::query_as(
                "select conversation_id::text, shop_id from conversations
                 where state = 'assigned' and assignee_employee_id = $1",
            )
            .bind(&employee)
            .fetch_all(&self.pool)
            .await?;
            let in_redis: HashSet<&str> = state.open.iter().map(String::as_str).collect();
            let in_record: HashSet<&str> = record.iter().map(|(c, _)| c.as_str()).collect();
            if in_redis == in_record {
                continue;
            }
            if let Some((added, removed)) = self
                .engine
                .repair(&employee, &state.version, &record)
                .await?
            {
                tracing::warn!(%employee, added, removed, "repaired slot drift");
                self.metrics.repairs.inc();
                repaired += 1;
            }
        }
        Ok(repaired)
    }

    /// Drains every shop that has conversations waiting for an employee. Capacity can appear
    /// with no event to announce it: a claim whose commit never came (the process died in
    /// between) frees its slot when its pending marker expires, and a drift repair may remove
    /// conversations. Shops are drained one at a time, the one waiting longest first, so each
    /// step reads one shop's queue through its index; a shop where nobody is free costs one
    /// refused claim, and a shop that fails is logged and skipped. One replica at a time sweeps
    /// (an advisory lock); the others return 0 at once. Returns how many were assigned.
    pub async fn sweep_waiting(&self) -> Result<u32, SlotError> {
        // A session-level lock on a connection of its own: released when the sweep ends, or
        // with the connection if the process dies.
        let mut lock = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
            .bind(SWEEP_LOCK)
            .fetch_one(&mut *lock)
            .await?;
        if !locked {
            return Ok(0);
        }
        let swept = self.sweep_shops().await;
        let unlocked = sqlx::query("select pg_advisory_unlock($1)")
            .bind(SWEEP_LOCK)
            .execute(&mut *lock)
            .await;
        if unlocked.is_err() {
            // The lock must not outlive the sweep on a pooled connection.
            lock.detach();
        }
        swept
    }

    async fn sweep_shops(&self) -> Result<u32, SlotError> {
        let shops: Vec<String> = sqlx::query_scalar(
            "select shop_id from conversations where state = 'waiting_for_employee'
             group by shop_id order by min(waiting_since), shop_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut assigned = 0;
        for shop in shops {
            match self.drain_shops(std::slice::from_ref(&shop)).await {
                Ok(n) => assigned += n,
                Err(error) => {
                    tracing::warn!(shop_id = %shop, %error, "sweeping a shop's queue failed");
                }
            }
        }
        if assigned > 0 {
            tracing::info!(
                assigned,
                "the periodic sweep assigned waiting conversations"
            );
            self.metrics.swept.inc_by(u64::from(assigned));
        }
        Ok(assigned)
    }

    /// The periodic drift check (which also triggers a rebuild after a loss) and the sweep of
    /// the waiting queue, until shutdown.
    pub async fn run_maintenance(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if let Err(error) = self.check_drift().await {
                tracing::warn!(%error, "slot drift check failed");
            }
            if let Err(error) = self.sweep_waiting().await {
                tracing::warn!(%error, "sweep of the waiting queue failed");
            }
        }
    }
}

/// Claims a batch made inside its transaction ([`SlotService::claim_in_batch`]), waiting for
/// that transaction to end.
pub struct BatchClaims {
    svc: SlotService,
    taken: Vec<(Conv, tracing::Span, Claimed)>,
    /// The taken claims the batch's transaction recorded (the others were fenced or lost).
    recorded: HashSet<Uuid>,
}

impl BatchClaims {
    /// Gives every taken claim back (the transaction will not commit them).
    async fn give_back(&self) {
        let taken: Vec<(String, String)> = self
            .taken
            .iter()
            .map(|(conv, _, claim)| (conv.id.to_string(), claim.employee_id.clone()))
            .collect();
        let engine = &self.svc.engine;
        let releases = taken.into_iter().map(|(cid, employee)| async move {
            // Best effort: the pending marker expires anyway.
            let _ = engine
                .release(&cid, Some(&employee), ReleaseMode::Rollback)
                .await;
        });
        futures::stream::iter(releases)
            .buffer_unordered(CONCURRENT_CLAIMS)
            .collect::<Vec<()>>()
            .await;
    }

    /// Once the batch's transaction has ended (`committed`: its commit succeeded): confirms
    /// the recorded claims in Redis and settles the others. Returns the conversations
    /// assigned; the caller's usual path takes the rest (claims are idempotent, so anything
    /// that failed here is simply claimed again).
    pub async fn settle(self, committed: bool) -> HashSet<Uuid> {
        let Self {
            svc,
            taken,
            recorded,
        } = self;
        if !committed {
            // The commit's answer may have been lost with the connection while the commit
            // itself went through. Reading the record at once could miss a commit still
            // being made visible and give back a slot it holds; a second later the record
            // decides safely (and the pending markers expire anyway).
            for (conv, _, claim) in taken {
                svc.settle_in_background(conv, claim.employee_id, Duration::from_secs(1));
            }
            return HashSet::new();
        }
        let (svc, recorded) = (&svc, &recorded);
        let settled = taken.into_iter().map(|(conv, span, claim)| {
            let inner = span.clone();
            async move {
                let confirmed = svc
                    .finish_claim(&conv, &claim, recorded.contains(&conv.id))
                    .await;
                confirmed.is_some_and(|r| r.is_ok()).then_some(conv.id)
            }
            .instrument(inner)
        });
        futures::stream::iter(settled)
            .buffer_unordered(CONCURRENT_CLAIMS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// How a commit attempt ended.
enum Committed {
    Yes,
    /// The claim came from an older Redis generation.
    Fenced,
    /// The conversation changed meanwhile (taken, closed).
    Lost,
}
