//! Where verified events go: RabbitMQ with publisher confirms in production. A trait so unit
//! and property tests can prove what was (not) published without a broker.

use futures::future::BoxFuture;
use shopctrl_amqp::{Outgoing, PublishError, Publisher};

pub trait EventSink: Send + Sync + 'static {
    /// Publishes and resolves once the broker confirmed (or refused).
    fn publish<'a>(&'a self, message: Outgoing<'a>) -> BoxFuture<'a, Result<(), PublishError>>;
    /// Whether the broker is reachable now (connects when needed).
    fn check(&self) -> BoxFuture<'_, bool>;
}

impl EventSink for Publisher {
    fn publish<'a>(&'a self, message: Outgoing<'a>) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(Publisher::publish(self, message))
    }

    fn check(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.channel().await.is_ok() })
    }
}
