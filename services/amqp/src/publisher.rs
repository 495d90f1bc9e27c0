use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

use crate::{headers::pairs_to_table, topology::connect};

/// Why a publish was not confirmed. In every case the caller must treat the message as not
/// sent (ingress answers 503, the outbox keeps the row).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ: {0}")]
    NotConnected(String),
    #[error("RabbitMQ refused the publish: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ nacked the message")]
    Nacked,
    #[error("no queue is bound for exchange {exchange} and routing key {routing_key}")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// The AMQP `type` property: the protobuf message's full name.
    pub message_type: &'a str,
    /// The AMQP `message_id` property: the event id consumers deduplicate on.
    pub message_id: &'a str,
    pub payload: &'a [u8],
    /// Extra string headers (trace context, reasons).
    pub headers: &'a [(String, String)],
    /// Return the message (and fail) when no queue is bound for it.
    pub mandatory: bool,
}

struct Live {
    // Kept so the connection is closed only when the channel is replaced.
    _connection: Connection,
    channel: Channel,
}

/// A confirmed publisher on one channel, shared by every task of a service: confirms are
/// pipelined because many tasks publish concurrently on the same channel. Reconnects on the
/// next publish after the broker went away.
#[derive(Clone)]
pub struct Publisher {
    url: Arc<str>,
    connection_name: Arc<str>,
    confirm_timeout: Duration,
    live: Arc<RwLock<Option<Arc<Live>>>>,
    reconnecting: Arc<tokio::sync::Mutex<()>>,
}

impl Publisher {
    /// Connects now, so a service fails fast at start when the broker is unreachable.
    pub async fn connect(
        url: &str,
        connection_name: &str,
        confirm_timeout: Duration,
    ) -> Result<Self, PublishError> {
        let publisher = Self::lazy(url, connection_name, confirm_timeout);
        publisher.channel().await?;
        Ok(publisher)
    }

    /// Creates the publisher without connecting; the first publish connects.
    pub fn lazy(url: &str, connection_name: &str, confirm_timeout: Duration) -> Self {
        Self {
            url: url.into(),
            connection_name: connection_name.into(),
            confirm_timeout,
            live: Arc::new(RwLock::new(None)),
            reconnecting: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Whether the channel is currently open.
    pub fn is_connected(&self) -> bool {
        self.current()
            .is_some_and(|live| live.channel.status().connected())
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.live.read().ok().and_then(|guard| guard.clone())
    }

    fn forget(&self, broken: &Arc<Live>) {
        if let Ok(mut guard) = self.live.write()
            && guard.as_ref().is_some_and(|live| Arc::ptr_eq(live, broken))
        {
            *guard = None;
        }
    }

    /// The open channel, connecting (once, whatever the number of callers) when needed.
    pub async fn channel(&self) -> Result<Channel, PublishError> {
        if let Some(live) = self.current()
            && live.channel.status().connected()
        {
            return Ok(live.channel.clone());
        }
        let _only_one = self.reconnecting.lock().await;
        if let Some(live) = self.current()
            && live.channel.status().connected()
        {
            return Ok(live.channel.clone());
        }
        let connection = connect(&self.url, &self.connection_name)
            .await
            .map_err(|e| PublishError::NotConnected(e.to_string()))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| PublishError::NotConnected(e.to_string()))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| PublishError::NotConnected(e.to_string()))?;
        let live = Arc::new(Live {
            _connection: connection,
            channel: channel.clone(),
        });
        if let Ok(mut guard) = self.live.write() {
            *guard = Some(live);
        }
        tracing::info!(name = %self.connection_name, "publisher connected to RabbitMQ");
        Ok(channel)
    }

    /// Publishes one persistent message and waits for the broker's confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), PublishError> {
        self.channel().await?;
        let Some(live) = self.current() else {
            return Err(PublishError::NotConnected("channel closed".into()));
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/x-protobuf".into())
            .with_type(message.message_type.into())
            .with_message_id(message.message_id.into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0).unsigned_abs())
            .with_headers(pairs_to_table(message.headers));
        let result = tokio::time::timeout(self.confirm_timeout, async {
            let pending = live
                .channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    message.payload,
                    properties,
                )
                .await?;
            pending.await
        })
        .await;
        match result {
            Err(_) => {
                // A missing confirm means the channel cannot be trusted any more.
                self.forget(&live);
                Err(PublishError::Timeout(self.confirm_timeout))
            }
            Ok(Err(error)) => {
                self.forget(&live);
                Err(PublishError::Broker(error))
            }
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(PublishError::Unroutable {
                exchange: message.exchange.to_owned(),
                routing_key: message.routing_key.to_owned(),
            }),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => {
                Err(PublishError::NotConnected("confirms not enabled".into()))
            }
        }
    }
}
