//! The slot engine behind the consumer's and the API's assignment seam ([`Assigner`]).
//!
//! The slot copy (`slot_shops`, `slot_candidates`, `slot_away` and Redis) follows routing's
//! local copy of the config service's data (`shop_settings`, `shop_members`, `presence`): a
//! shop is synced whenever its settings version or fetch time moved since the last sync, and
//! on every capacity change or withdrawal the seam reports.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use shopctrl_proto::v1::{HandoverRequest, Presence};
use sqlx::Row;
use uuid::Uuid;

use super::{Assignment, ClaimKind, SlotError, SlotService};
use crate::assign::{AssignError, Assigned, Assigner, BatchSettle, WaitingConversation};

/// How long a shop where every claim of a round was refused is not asked again for
/// conversations that were already waiting. Those repeats (one per customer message) are a
/// repair and nearly always refused; capacity that appears meanwhile is drained by
/// `capacity_changed` or by the periodic sweep, and a repeat after this pause asks again.
const REPEAT_PAUSE: Duration = Duration::from_secs(1);

/// Beyond this many shops remembered, the expired ones are forgotten.
const PAUSED_SHOPS_PRUNE: usize = 1024;

impl From<SlotError> for AssignError {
    fn from(error: SlotError) -> Self {
        match error {
            SlotError::NotFound(_) => AssignError::NotFound,
            SlotError::NoFreeSlot { .. } => AssignError::NoFreeSlot,
            SlotError::NoPermission => {
                AssignError::Refused("the employee has no Chat permission at this shop".into())
            }
            SlotError::Closed(_) => AssignError::Refused("the conversation is closed".into()),
            other => AssignError::Unavailable(other.to_string()),
        }
    }
}

impl BatchSettle for super::BatchClaims {
    fn settle(
        self: Box<Self>,
        committed: bool,
    ) -> BoxFuture<'static, std::collections::HashSet<Uuid>> {
        Box::pin(async move { (*self).settle(committed).await })
    }
}

/// [`Assigner`] with atomic slot claims.
pub struct SlotAssigner {
    svc: SlotService,
    /// Stops background work (the drift check) when the assigner goes away.
    _stop: Option<tokio_util::sync::DropGuard>,
    /// Shops where this replica's last round of claims was refused throughout, and until
    /// when their repeats are skipped.
    paused: Mutex<HashMap<String, Instant>>,
    repeat_pause: Duration,
}

impl SlotAssigner {
    pub fn new(svc: SlotService) -> Self {
        Self {
            svc,
            _stop: None,
            paused: Mutex::new(HashMap::new()),
            repeat_pause: REPEAT_PAUSE,
        }
    }

    /// Another pause for repeats than [`REPEAT_PAUSE`] (tests: zero, or longer than the test).
    pub fn with_repeat_pause(mut self, pause: Duration) -> Self {
        self.repeat_pause = pause;
        self
    }

    fn paused(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // The map is only ever left consistent; a panic elsewhere does not spoil it.
        self.paused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers which shops refused every claim of a round (`true`) and forgets the others.
    /// A pause that is still running is not extended, so a full shop's repeats are asked
    /// again at least once per pause, however many other claims it keeps refusing.
    fn note_rounds(&self, refused_throughout: HashMap<String, bool>) {
        let now = Instant::now();
        let mut paused = self.paused();
        for (shop, refused) in refused_throughout {
            if refused {
                let until = paused.entry(shop).or_insert(now);
                if *until <= now {
                    *until = now + self.repeat_pause;
                }
            } else {
                paused.remove(&shop);
            }
        }
        if paused.len() > PAUSED_SHOPS_PRUNE {
            paused.retain(|_, until| *until > now);
        }
    }

    /// Cancels `stop` when this assigner is dropped.
    pub fn stopping_on_drop(mut self, stop: tokio_util::sync::CancellationToken) -> Self {
        self._stop = Some(stop.drop_guard());
        self
    }

    pub fn service(&self) -> &SlotService {
        &self.svc
    }

    /// Brings the slot copy of a shop in line with the local config copy: when `force`, or
    /// when the settings version or fetch time moved since the last sync.
    pub async fn sync_shop(&self, shop_id: &str, force: bool) -> Result<(), SlotError> {
        let pool = self.svc.pool();
        let Some(row) = sqlx::query(
            "select s.conversation_slots, s.version, s.refreshed_at,
                    x.synced_version, x.synced_refresh
             from shop_settings s left join slot_shops x on x.shop_id = s.shop_id
             where s.shop_id = $1",
        )
        .bind(shop_id)
        .fetch_optional(pool)
        .await?
        else {
            // Unknown shop: nothing to claim with (the claim answers slots_zero).
            return Ok(());
        };
        let slots: i32 = row.try_get("conversation_slots")?;
        let version: i64 = row.try_get("version")?;
        let refreshed: chrono::DateTime<chrono::Utc> = row.try_get("refreshed_at")?;
        let synced_version: Option<i64> = row.try_get("synced_version")?;
        let synced_refresh: Option<chrono::DateTime<chrono::Utc>> =
            row.try_get("synced_refresh")?;
        if !force && synced_version == Some(version) && synced_refresh == Some(refreshed) {
            return Ok(());
        }
        self.svc.apply_slots(shop_id, slots.max(0) as u32).await?;
        let members: Vec<(String, String)> = sqlx::query_as(
            "select employee_id, display_name from shop_members
             where shop_id = $1 and chat_permission order by employee_id",
        )
        .bind(shop_id)
        .fetch_all(pool)
        .await?;
        let current = self.svc.candidates(shop_id).await?;
        self.svc.apply_grants(shop_id, &members).await?;
        let granted: HashSet<&str> = members.iter().map(|(e, _)| e.as_str()).collect();
        for employee in current {
            if !granted.contains(employee.as_str()) {
                self.svc.withdraw_permission(shop_id, &employee).await?;
            }
        }
        sqlx::query(
            "update slot_shops set synced_version = $2, synced_refresh = $3 where shop_id = $1",
        )
        .bind(shop_id)
        .bind(version)
        .bind(refreshed)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Presence from the local copy (no row: online).
    async fn sync_presence(&self, employee_id: &str) -> Result<(), SlotError> {
        let presence: Option<i16> =
            sqlx::query_scalar("select presence from presence where employee_id = $1")
                .bind(employee_id)
                .fetch_optional(self.svc.pool())
                .await?;
        let present = presence.is_none_or(|p| p == Presence::Online as i16);
        self.svc.apply_presence(employee_id, present).await
    }

    async fn shop_of(&self, conversation_id: Uuid) -> Result<Option<String>, SlotError> {
        Ok(
            sqlx::query_scalar("select shop_id from conversations where conversation_id = $1")
                .bind(conversation_id)
                .fetch_optional(self.svc.pool())
                .await?,
        )
    }

    /// The conversation a handover is about: the open one; else, for a closed one, the shop's
    /// closed-conversation setting (reopen the latest, or start a new one); else (the handover
    /// overtook the customer's message) a new one, waiting for the handover.
    async fn handover_target(&self, request: &HandoverRequest) -> Result<Uuid, SlotError> {
        let mut tx = self.svc.pool().begin().await?;
        let shop = request.shop_id.as_str();
        let mb = request.messagebird_conversation_id.as_str();
        let open: Option<Uuid> = sqlx::query_scalar(
            "select conversation_id from conversations
             where shop_id = $1 and messagebird_conversation_id = $2 and state <> 'closed'
             for update",
        )
        .bind(shop)
        .bind(mb)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = open {
            tx.commit().await?;
            return Ok(id);
        }
        let new_on_closed: Option<bool> = sqlx::query_scalar(
            "select new_conversation_on_closed from shop_settings where shop_id = $1",
        )
        .bind(shop)
        .fetch_optional(&mut *tx)
        .await?;
        if new_on_closed == Some(false) {
            let reopened: Option<Uuid> = sqlx::query_scalar(
                "update conversations set state = 'waiting_for_handover',
                        unassigned_reason = 'awaiting_handover', waiting_since = now(),
                        closed_at = null, closed_by_employee_id = null, via_handover = false
                 where conversation_id = (
                    select conversation_id from conversations
                    where shop_id = $1 and messagebird_conversation_id = $2 and state = 'closed'
                    order by created_at desc limit 1)
                 returning conversation_id",
            )
            .bind(shop)
            .bind(mb)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(id) = reopened {
                tx.commit().await?;
                return Ok(id);
            }
        }
        let msisdn = shopctrl_domain::normalize_msisdn(&request.msisdn).ok();
        let contact = msisdn.is_none().then(|| format!("conversation:{mb}"));
        let customer: Uuid = match &msisdn {
            Some(m) => {
                sqlx::query_scalar(
                    "insert into customers (customer_id, shop_id, msisdn) values ($1, $2, $3)
                     on conflict (shop_id, msisdn) where msisdn is not null
                     do update set msisdn = excluded.msisdn
                     returning customer_id",
                )
                .bind(Uuid::now_v7())
                .bind(shop)
                .bind(m)
                .fetch_one(&mut *tx)
                .await?
            }
            None => {
                sqlx::query_scalar(
                    "insert into customers (customer_id, shop_id, messagebird_contact_id)
                     values ($1, $2, $3)
                     on conflict (shop_id, messagebird_contact_id) where msisdn is null
                     do update set messagebird_contact_id = excluded.messagebird_contact_id
                     returning customer_id",
                )
                .bind(Uuid::now_v7())
                .bind(shop)
                .bind(&contact)
                .fetch_one(&mut *tx)
                .await?
            }
        };
        let id = Uuid::now_v7();
        sqlx::query(
            "insert into conversations (conversation_id, shop_id, messagebird_conversation_id,
                customer_id, channel, channel_id, state, unassigned_reason, waiting_since)
             values ($1, $2, $3, $4, 0, $5, 'waiting_for_handover', 'awaiting_handover', now())",
        )
        .bind(id)
        .bind(shop)
        .bind(mb)
        .bind(customer)
        .bind(&request.channel_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }
}

impl Assigner for SlotAssigner {
    fn conversations_waiting(
        &self,
        waiting: Vec<WaitingConversation>,
    ) -> BoxFuture<'_, Result<(), AssignError>> {
        Box::pin(async move {
            let now = Instant::now();
            let asked = waiting.len();
            let waiting: Vec<WaitingConversation> = {
                let paused = self.paused();
                waiting
                    .into_iter()
                    .filter(|w| {
                        !w.repeat || paused.get(&w.shop_id).is_none_or(|until| *until <= now)
                    })
                    .collect()
            };
            // Counted once the round is answered: a round the caller retries (the assigner
            // unavailable) counts its skips with the attempt that goes through.
            let skipped = (asked - waiting.len()) as u64;
            if waiting.is_empty() {
                self.svc.metrics().repeats_skipped.inc_by(skipped);
                return Ok(());
            }
            // One read for all of them (this runs for every customer message of a waiting
            // conversation), with whether each shop's slot copy is behind its settings.
            let ids: Vec<Uuid> = waiting.iter().map(|w| w.conversation_id).collect();
            let loaded = self.svc.load_waiting(&ids).await?;
            let mut behind: Vec<String> = loaded
                .iter()
                .filter(|(_, behind)| *behind)
                .map(|(conv, _)| conv.shop_id.clone())
                .collect();
            behind.sort_unstable();
            behind.dedup();
            // A shop whose sync fails keeps its conversations waiting for the retry; the other
            // shops' conversations are claimed meanwhile.
            let mut unavailable = None;
            let mut failed = Vec::new();
            for shop in behind {
                if let Err(error) = self.sync_shop(&shop, false).await {
                    unavailable = Some(AssignError::from(error));
                    failed.push(shop);
                }
            }
            let mut spans: HashMap<Uuid, tracing::Span> = waiting
                .into_iter()
                .map(|w| (w.conversation_id, w.span))
                .collect();
            let mut shops = HashMap::new();
            let claims = loaded
                .into_iter()
                .filter(|(conv, _)| !failed.contains(&conv.shop_id))
                .map(|(conv, shop_behind)| {
                    let span = spans.remove(&conv.id).unwrap_or_else(tracing::Span::none);
                    shops.insert(conv.id, conv.shop_id.clone());
                    // A shop just synced may have changed what the claim reads: read again.
                    (conv.id, (!shop_behind).then_some(conv), span)
                })
                .collect();
            let results: Vec<_> = self
                .svc
                .assign_many(claims, ClaimKind::Auto)
                .await
                .into_iter()
                .filter_map(|(id, result)| Some((shops.remove(&id)?, result)))
                .collect();
            // Each shop's waiting reason once for the batch: the last refusal's.
            let mut reasons = std::collections::BTreeMap::new();
            let mut refused_throughout: HashMap<String, bool> = HashMap::new();
            for (shop, result) in results {
                let refused = matches!(result, Ok(Assignment::Waiting { .. }));
                *refused_throughout.entry(shop.clone()).or_insert(true) &= refused;
                match result {
                    Ok(Assignment::Waiting { reason }) => {
                        reasons.insert(shop, reason);
                    }
                    Ok(_) => {}
                    Err(error) => match AssignError::from(error) {
                        error @ AssignError::Unavailable(_) => unavailable = Some(error),
                        // An answer, not an outage: the conversation stays in the queue.
                        error => tracing::warn!(%error, "claim refused"),
                    },
                }
            }
            for (shop, reason) in reasons {
                if let Err(error) = self.svc.set_reason(&shop, reason).await {
                    unavailable = Some(error.into());
                    refused_throughout.insert(shop, false);
                }
            }
            self.note_rounds(refused_throughout);
            if unavailable.is_none() {
                self.svc.metrics().repeats_skipped.inc_by(skipped);
            }
            unavailable.map_or(Ok(()), Err)
        })
    }

    fn claim_in_batch<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        waiting: Vec<(Uuid, tracing::Span)>,
    ) -> BoxFuture<'a, Result<Option<Box<dyn BatchSettle>>, AssignError>> {
        Box::pin(async move {
            let claims = self.svc.claim_in_batch(conn, &waiting).await?;
            Ok(Some(Box::new(claims) as Box<dyn BatchSettle>))
        })
    }

    fn handover(&self, request: HandoverRequest) -> BoxFuture<'_, Result<(), AssignError>> {
        Box::pin(async move {
            let id = self.handover_target(&request).await?;
            self.sync_shop(&request.shop_id, false).await?;
            self.svc.handover(id).await?;
            Ok(())
        })
    }

    fn capacity_changed<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AssignError>> {
        Box::pin(async move {
            self.paused().remove(shop_id);
            self.sync_shop(shop_id, true).await?;
            if let Some(employee) = employee_id {
                self.sync_presence(employee).await?;
                // Gives back slots of conversations the record took from them, then drains
                // all their shops.
                self.svc.employee_freed(employee).await?;
            }
            self.svc.drain_shops(&[shop_id.to_owned()]).await?;
            Ok(())
        })
    }

    fn manual_assign<'a>(
        &'a self,
        conversation_id: Uuid,
        employee_id: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<Assigned, AssignError>> {
        Box::pin(async move {
            let Some(shop) = self.shop_of(conversation_id).await? else {
                return Err(AssignError::NotFound);
            };
            self.sync_shop(&shop, false).await?;
            let (employee_id, over_limit) = self
                .svc
                .manual_assign(conversation_id, employee_id, force)
                .await?;
            Ok(Assigned {
                conversation_id,
                employee_id,
                over_limit,
            })
        })
    }

    fn role_withdrawn<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: &'a str,
    ) -> BoxFuture<'a, Result<(), AssignError>> {
        Box::pin(async move {
            self.svc.withdraw_permission(shop_id, employee_id).await?;
            Ok(())
        })
    }
}
