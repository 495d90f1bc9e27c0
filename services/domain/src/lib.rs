//! Identifiers and the small domain rules that more than one service must apply identically:
//! shop and employee ids, MSISDN normalization, the shard a conversation travels through,
//! message-status ranking and how secrets are shown. Lightweight on purpose, so any crate can
//! depend on it.

mod ids;
mod msisdn;
mod secret;
mod shard;
mod status;

pub use ids::{EmployeeId, IdError, ShopId};
pub use msisdn::{MsisdnError, normalize_msisdn};
pub use secret::{last4, mask};
pub use shard::{ShardCount, ShardCountError, shard_for, shard_routing_key};
pub use status::{message_status_from_messagebird, status_rank, status_update_allowed};
