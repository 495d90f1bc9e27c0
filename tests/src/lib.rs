//! The MessageBird simulator and end-to-end test support: webhooks signed exactly as
//! MessageBird signs them, in every payload shape ingress must accept, and the MessageBird
//! side that our services call.

pub mod bench;
pub mod conversations_api;
pub mod demo;
pub mod flow_receiver;
pub mod load;
pub mod messagebird_side;
pub mod signing;
pub mod webhooks;
