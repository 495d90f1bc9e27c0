//! `flow-callback` delivers everything ShopCtrl Messaging sends out of the cluster: availability
//! events (an employee took the conversation, or nobody is available and it waits at position
//! n) to the Event webhook URL of the shop's MessageBird flow, and agent replies to the
//! MessageBird Conversations API. It is the only service that makes outbound HTTP calls, and it
//! keeps no state of its own: RabbitMQ holds every message until it is delivered, parked for a
//! retry, or dead-lettered.
//!
//! # Delivery
//! Flow events (`messaging.flow`, key `flow`) and agent replies (`messaging.outbound`, key
//! `send`) land in two quorum work queues. Each message gets one attempt at a time, with a
//! request timeout. Any 2xx is success. A failed attempt (timeout, connection error, non-2xx
//! from a flow; 429 or 5xx from MessageBird) is parked in a delay-tier queue chosen by the
//! retry schedule with jitter, lengthened by `Retry-After` up to a bound (see [`retry`] and
//! [`topology`]); no consumer sleeps. After the schedule's last attempt the message goes to
//! the dead-letter queue `messaging.dlq.flow-callback.<flow|send>` with the last error in the
//! `x-dead-letter-reason` header. Availability events older than `FLOW_EVENT_MAX_AGE_SECONDS`
//! are dropped and counted instead of delivered late.
//!
//! # Availability events
//! Posted as flat JSON ([`flow::FlowPayload`]) and signed ([`signing`]): `Idempotency-Key` and
//! `X-ShopCtrl-Event-Id` carry the event id, `X-ShopCtrl-Timestamp` the Unix seconds, and
//! `X-ShopCtrl-Signature` is `v1=<hex HMAC-SHA256(callback secret, "<event id>.<timestamp>.<body>")>`.
//! The URL passes the SSRF guard ([`ssrf`]) before and while connecting.
//!
//! # Agent replies
//! Sent with the shop's access key (`Authorization: AccessKey …`) as free-form text inside the
//! WhatsApp 24-hour window and as the shop's default template outside it ([`messagebird`]).
//! Every outcome (accepted, refused by MessageBird with its code and description, or failed on
//! our side) is published as an `OutboundSendResult` (`messaging.outbound`, key `result`) and
//! confirmed before the reply is acked.
//!
//! # Shop settings
//! Read from config's `ConfigInternalService.GetDeliveryShop`, cached per replica, and dropped
//! when a config-changed event for the shop arrives on this replica's own queue.

pub mod app;
pub mod flow;
pub mod messagebird;
pub mod metrics;
pub mod retry;
pub mod settings;
pub mod shops;
pub mod signing;
pub mod ssrf;
pub mod topology;
pub mod worker;

pub use app::{App, AppError, Deps};
pub use settings::{Cli, Command, Settings};
