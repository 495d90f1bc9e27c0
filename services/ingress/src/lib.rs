//! The ingress service: the only door MessageBird knocks on. It verifies Conversations API
//! webhooks (`MessageBird-Signature-JWT`, optionally the legacy HMAC scheme) and flow handover
//! requests (the shop's handover secret), normalizes them into protobuf events, and publishes
//! them to the inbound exchange with publisher confirms, answering 2xx only after the broker
//! confirmed. Shop secrets come from the config service, cached per shop and dropped on
//! config-changed events; token ids are remembered in Redis so replays are not published twice.

pub mod app;
pub mod config_events;
pub mod connections;
pub mod fake_config;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod payload;
pub mod replay;
pub mod settings;
pub mod signature;
pub mod sink;

pub use app::App;
pub use settings::{Cli, Command, Settings};
