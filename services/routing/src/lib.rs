//! The routing service of ShopCtrl Messaging. It consumes the inbound MessageBird events that
//! ingress publishes to sharded quorum queues (one active consumer per shard, so each
//! conversation's events apply in order on any number of replicas) and keeps the durable record
//! in PostgreSQL: customers by MSISDN, conversations and their lifecycle, messages with
//! monotonic statuses, links to orders and tickets, and the 24-hour window clock. It serves the
//! agent API over gRPC (dialog lists, history, replies, closing, presence and a resumable
//! per-employee event stream) and publishes what follows a database change through a
//! transactional outbox. Slot claims plug in behind the [`assign::Assigner`] seam.

pub mod access;
pub mod api;
pub mod app;
pub mod assign;
pub mod auth;
pub mod consumer;
pub mod ingest;
pub mod metrics;
pub mod notify;
pub mod sequencer;
pub mod settings;
pub mod side;
pub mod slots;
pub mod store;

pub use app::{App, Overrides, StartError, migrate};
pub use settings::{Cli, Command, Settings};
