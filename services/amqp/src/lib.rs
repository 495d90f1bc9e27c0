//! RabbitMQ for ShopCtrl Messaging: the topology (exchanges, quorum queues, dead-lettering,
//! all names under an optional prefix so tests can run side by side), a publisher that only
//! reports success once the broker confirmed, a consumer loop that acks only after the handler
//! succeeded, and the transactional outbox that relays database-committed events with confirms.

mod consumer;
mod headers;
mod outbox;
mod publisher;
mod topology;

pub use consumer::{ConsumeError, ConsumerConfig, Handled, Incoming, consume_span, run_consumer};
pub use headers::{headers_to_pairs, string_header};
pub use outbox::{
    OutboxBatch, OutboxError, OutboxMessage, OutboxRelay, Wake, enqueue as outbox_enqueue,
    enqueue_many as outbox_enqueue_many,
};
pub use publisher::{Outgoing, PublishError, Publisher};
pub use topology::{Names, QueueSpec, TopologyError, connect, declare_exchange, declare_queue};

pub use lapin;
