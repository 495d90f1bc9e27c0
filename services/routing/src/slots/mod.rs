//! Slot claims: who gets a conversation, atomically, with slots shared across shops.
//!
//! Redis holds the state every claim decides on (a shop's slot limit and candidates, presence,
//! each employee's committed and pending conversations, stickiness and idle order) and one Lua
//! script per operation checks and takes a slot in a single step ([`engine`]). PostgreSQL is
//! the record ([`service`]): a claim is pending in Redis until the assignment committed in
//! PostgreSQL, then confirmed; a failed commit gives the slot back, and a crash in between
//! only delays the slot's return until the pending marker expires. When Redis loses its data
//! (detected by the missing epoch key) every script answers "rebuild" until one replica, holding
//! a lease, rebuilt the keys from PostgreSQL; commits are fenced on the epoch so a claim made
//! before the loss can never commit behind the rebuild's back.
//!
//! Policy among the candidates of a shop (employees with the Chat permission who are present):
//! only those whose open conversations across all shops are below the shop's limit; the one who
//! last served the customer if among them; otherwise the least loaded, ties to the one whose
//! last assignment or close is longest ago (then the smallest employee id).

pub mod assigner;
pub mod engine;
pub mod service;
pub mod wiring;

use prometheus_client::{metrics::counter::Counter, registry::Registry};

pub use assigner::SlotAssigner;
pub use engine::{
    AssignOutcome, ClaimOutcome, Claimed, ConfirmOutcome, EmployeeState, RebuildStart, ReleaseMode,
    ReleaseOutcome, SlotEngine, script_source,
};
pub use service::{Assignment, BatchClaims, ClaimKind, HandoverOutcome, SlotService, SlotSettings};

/// Why a conversation is not assigned (stored in `conversations.unassigned_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnassignedReason {
    SlotsZero,
    NoPermission,
    AllFull,
    AllAway,
    AwaitingHandover,
}

impl UnassignedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlotsZero => "slots_zero",
            Self::NoPermission => "no_permission",
            Self::AllFull => "all_full",
            Self::AllAway => "all_away",
            Self::AwaitingHandover => "awaiting_handover",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "slots_zero" => Self::SlotsZero,
            "no_permission" => Self::NoPermission,
            "all_full" => Self::AllFull,
            "all_away" => Self::AllAway,
            "awaiting_handover" => Self::AwaitingHandover,
            _ => return None,
        })
    }

    /// The protobuf enum value.
    pub fn to_proto(self) -> shopctrl_proto::v1::UnassignedReason {
        use shopctrl_proto::v1::UnassignedReason as P;
        match self {
            Self::SlotsZero => P::SlotsZero,
            Self::NoPermission => P::NoPermission,
            Self::AllFull => P::AllFull,
            Self::AllAway => P::AllAway,
            Self::AwaitingHandover => P::AwaitingHandover,
        }
    }
}

/// Why a slot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] shopctrl_amqp::OutboxError),
    #[error("unexpected slot script reply: {0}")]
    Protocol(String),
    #[error("slot data is being rebuilt from PostgreSQL")]
    Rebuilding,
    #[error("the rebuild lease was lost")]
    LeaseLost,
    #[error("another claim on this conversation is in flight")]
    Busy,
    #[error("conversation {0} not found")]
    NotFound(uuid::Uuid),
    #[error("conversation {0} is closed")]
    Closed(uuid::Uuid),
    #[error("the employee has no Chat permission at this shop")]
    NoPermission,
    #[error("the employee has no free slot ({open} open, limit {slots})")]
    NoFreeSlot { open: u32, slots: u32 },
}

impl SlotError {
    /// Infrastructure trouble or a race that settles by itself: retry later, never
    /// dead-letter.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Redis(_) | Self::Database(_) | Self::Outbox(_) | Self::Rebuilding | Self::Busy
        ) || matches!(self, Self::LeaseLost)
    }
}

/// Counters of the slot engine.
#[derive(Clone, Default)]
pub struct SlotMetrics {
    /// Employees whose Redis state the drift check corrected.
    pub repairs: Counter,
    /// Rebuilds of the Redis data from PostgreSQL.
    pub rebuilds: Counter,
    /// Manual assignments over the limit (force).
    pub forced: Counter,
    /// Waiting conversations assigned by the periodic sweep, not by an event: capacity that
    /// appeared silently (an abandoned claim expired, a repair).
    pub swept: Counter,
    /// Repeated claims of waiting conversations skipped because their shop had just refused
    /// every claim (see `SlotAssigner`).
    pub repeats_skipped: Counter,
}

impl SlotMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "routing_redis_repairs",
            "Employees whose slot counters were repaired from PostgreSQL",
            self.repairs.clone(),
        );
        registry.register(
            "routing_redis_rebuilds",
            "Rebuilds of the slot data after Redis lost it",
            self.rebuilds.clone(),
        );
        registry.register(
            "routing_forced_assignments",
            "Manual assignments over the slot limit",
            self.forced.clone(),
        );
        registry.register(
            "routing_swept_assignments",
            "Waiting conversations assigned by the periodic sweep rather than by an event",
            self.swept.clone(),
        );
        registry.register(
            "routing_claim_repeats_skipped",
            "Repeated claims of waiting conversations skipped while their shop refused everyone",
            self.repeats_skipped.clone(),
        );
    }
}
