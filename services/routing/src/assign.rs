//! The assignment seam. The consumer and the agent API tell an [`Assigner`] when a
//! conversation wants an employee or when capacity may have appeared; the real slot claims
//! (Redis, part 2) implement it. [`QueueOnly`] only files conversations in the queue with the
//! reason nobody took them, which is what part 1 needs to be complete and testable.

use std::collections::HashSet;

use futures::future::BoxFuture;
use shopctrl_proto::v1::{HandoverRequest, Presence};
use sqlx::PgPool;
use uuid::Uuid;

use crate::store;

/// Why an assignment step failed.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// Infrastructure trouble: the caller retries (the consumer pauses its shard).
    #[error("assignment infrastructure unavailable: {0}")]
    Unavailable(String),
    #[error("conversation not found")]
    NotFound,
    #[error("{0}")]
    Refused(String),
    /// The employee has no free slot (manual assignment without `force`).
    #[error("the employee has no free conversation slot")]
    NoFreeSlot,
    #[error("manual assignment is not available in this build")]
    Unsupported,
}

impl From<sqlx::Error> for AssignError {
    fn from(error: sqlx::Error) -> Self {
        if store::is_transient(&error) {
            AssignError::Unavailable(error.to_string())
        } else {
            AssignError::Refused(error.to_string())
        }
    }
}

/// The result of a manual assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub conversation_id: Uuid,
    pub employee_id: String,
    /// Recorded as over the employee's limit (forced).
    pub over_limit: bool,
}

/// A conversation an inbound event found waiting for an employee.
#[derive(Debug, Clone)]
pub struct WaitingConversation {
    pub conversation_id: Uuid,
    pub shop_id: String,
    /// It was waiting before the event (a customer's further message), as opposed to created
    /// or reopened by it, or found by a redelivered event (which may have started it before a
    /// crash): asking again is a repair, nearly always refused.
    pub repeat: bool,
    /// The span of the event that asked, so the claim joins that event's trace.
    pub span: tracing::Span,
}

/// What routing asks of the assignment logic. Every method but
/// [`Assigner::claim_in_batch`] is called after the caller's transaction committed, and all
/// must be idempotent: a redelivered event calls them again.
pub trait Assigner: Send + Sync + 'static {
    /// Customer messages created or reopened these conversations, or wrote to them while
    /// they wait, or they are still waiting when their events are redelivered (so a crash
    /// between commit and this call is repaired by the redelivery). An implementation may
    /// skip the repeats of a shop where nobody had room a moment ago (capacity that appears
    /// is drained by [`Assigner::capacity_changed`] and the periodic sweep). An `Unavailable`
    /// error means the caller retries them all (claims are idempotent).
    fn conversations_waiting(
        &self,
        waiting: Vec<WaitingConversation>,
    ) -> BoxFuture<'_, Result<(), AssignError>>;
    /// Optionally claims for waiting conversations inside the caller's batch transaction,
    /// before its commit, so the assignments commit with the messages that made the
    /// conversations wait. The caller must settle what this returns once the transaction
    /// has ended, and then passes the conversations it did not deal with to
    /// [`Assigner::conversations_waiting`] as usual. On an error nothing is left claimed;
    /// the caller rolls back what this wrote (a savepoint) and commits without it. The
    /// default takes none.
    fn claim_in_batch<'a>(
        &'a self,
        _conn: &'a mut sqlx::PgConnection,
        _waiting: Vec<(Uuid, tracing::Span)>,
    ) -> BoxFuture<'a, Result<Option<Box<dyn BatchSettle>>, AssignError>> {
        Box::pin(async { Ok(None) })
    }
    /// A flow asked for a human (see DESIGN.md's handover cases). Called in shard order, after
    /// every earlier event of that conversation was committed.
    fn handover(&self, request: HandoverRequest) -> BoxFuture<'_, Result<(), AssignError>>;
    /// A slot may have freed or capacity appeared: close, transfer, presence online,
    /// permission granted, slots raised. `employee_id` is the employee concerned, if one.
    fn capacity_changed<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AssignError>>;
    fn manual_assign<'a>(
        &'a self,
        conversation_id: Uuid,
        employee_id: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<Assigned, AssignError>>;
    /// The employee lost the role or the Chat permission at the shop.
    fn role_withdrawn<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: &'a str,
    ) -> BoxFuture<'a, Result<(), AssignError>>;
}

/// Claims made inside a batch's transaction ([`Assigner::claim_in_batch`]).
pub trait BatchSettle: Send {
    /// Called once the transaction has ended; `committed` says whether its commit succeeded.
    /// Returns the conversations assigned.
    fn settle(self: Box<Self>, committed: bool) -> BoxFuture<'static, HashSet<Uuid>>;
}

/// Files conversations in the queue and never assigns anyone.
#[derive(Clone)]
pub struct QueueOnly {
    pool: PgPool,
}

impl QueueOnly {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl Assigner for QueueOnly {
    fn conversations_waiting(
        &self,
        waiting: Vec<WaitingConversation>,
    ) -> BoxFuture<'_, Result<(), AssignError>> {
        Box::pin(async move {
            for WaitingConversation {
                conversation_id, ..
            } in waiting
            {
                let Some(shop_id) = sqlx::query_scalar::<_, String>(
                    "select shop_id from conversations
                     where conversation_id = $1 and state = 'waiting_for_employee'",
                )
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?
                else {
                    continue;
                };
                let reason = unassigned_reason(&self.pool, &shop_id).await?;
                sqlx::query(
                    "update conversations set unassigned_reason = $2
                     where conversation_id = $1 and state = 'waiting_for_employee'",
                )
                .bind(conversation_id)
                .bind(reason)
                .execute(&self.pool)
                .await?;
            }
            Ok(())
        })
    }

    fn handover(&self, request: HandoverRequest) -> BoxFuture<'_, Result<(), AssignError>> {
        Box::pin(async move {
            // Only the queue move; creating an unknown conversation and the flow events are
            // part 2's. Repeated handovers find the conversation already waiting: no change.
            let reason = unassigned_reason(&self.pool, &request.shop_id).await?;
            sqlx::query(
                "update conversations set state = 'waiting_for_employee', via_handover = true,
                        unassigned_reason = $3, waiting_since = coalesce(waiting_since, now())
                 where shop_id = $1 and messagebird_conversation_id = $2
                   and state = 'waiting_for_handover'",
            )
            .bind(&request.shop_id)
            .bind(&request.messagebird_conversation_id)
            .bind(reason)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn capacity_changed<'a>(
        &'a self,
        _shop_id: &'a str,
        _employee_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AssignError>> {
        Box::pin(async { Ok(()) })
    }

    fn manual_assign<'a>(
        &'a self,
        _conversation_id: Uuid,
        _employee_id: &'a str,
        _force: bool,
    ) -> BoxFuture<'a, Result<Assigned, AssignError>> {
        Box::pin(async { Err(AssignError::Unsupported) })
    }

    fn role_withdrawn<'a>(
        &'a self,
        _shop_id: &'a str,
        _employee_id: &'a str,
    ) -> BoxFuture<'a, Result<(), AssignError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Why nobody takes a conversation of this shop right now, from the local copy: slots 0, no
/// Chat permission, everyone away, or (otherwise) everyone full.
pub async fn unassigned_reason(pool: &PgPool, shop_id: &str) -> Result<&'static str, sqlx::Error> {
    let slots: Option<i32> =
        sqlx::query_scalar("select conversation_slots from shop_settings where shop_id = $1")
            .bind(shop_id)
            .fetch_optional(pool)
            .await?;
    if slots.unwrap_or(0) == 0 {
        return Ok("slots_zero");
    }
    let (chatters, present): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where coalesce(p.presence, $2) = $2)
         from shop_members m left join presence p using (employee_id)
         where m.shop_id = $1 and m.chat_permission",
    )
    .bind(shop_id)
    .bind(Presence::Online as i16)
    .fetch_one(pool)
    .await?;
    Ok(if chatters == 0 {
        "no_permission"
    } else if present == 0 {
        "all_away"
    } else {
        "all_full"
    })
}

/// The assigner the service runs with.
pub fn default_assigner(pool: &PgPool) -> std::sync::Arc<dyn Assigner> {
    std::sync::Arc::new(QueueOnly::new(pool.clone()))
}
