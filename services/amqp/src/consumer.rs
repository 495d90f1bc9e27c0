use std::{future::Future, pin::Pin, time::Duration};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    },
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    headers::{headers_to_pairs, pairs_to_table},
    topology::{TopologyError, connect},
};

/// What the handler decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The effect is committed: ack.
    Ack,
    /// Infrastructure trouble (database, Redis, broker unreachable). The message is not at
    /// fault: keep it, pause, and retry the same message with backoff until it works or the
    /// service shuts down. Never counts towards dead-lettering.
    Transient(String),
    /// The message itself failed (a rule it violates). Retried a bounded number of times, then
    /// dead-lettered with this reason.
    Failed(String),
    /// The message can never succeed (cannot be parsed): dead-letter it now with this reason.
    Poison(String),
}

/// A delivery as the handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub data: Vec<u8>,
    pub routing_key: String,
    pub redelivered: bool,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    /// String headers, trace context included.
    pub headers: Vec<(String, String)>,
    /// 1 on the first try in this process.
    pub attempt: u32,
}

impl Incoming {
    fn from_delivery(delivery: &Delivery, attempt: u32) -> Self {
        Self {
            data: delivery.data.clone(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            redelivered: delivery.redelivered,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            message_type: delivery
                .properties
                .kind()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            headers: headers_to_pairs(delivery.properties.headers().as_ref()),
            attempt,
        }
    }
}

/// The consumer span of one delivery: a child of the producer's trace context carried in
/// the message headers, so one trace follows an event across services.
pub fn consume_span(
    queue: &str,
    message_id: Option<&str>,
    headers: &[(String, String)],
    attempt: u32,
) -> tracing::Span {
    let span = tracing::info_span!(
        "amqp.consume",
        queue = %queue,
        message_id = message_id.unwrap_or(""),
        attempt,
        otel.kind = "consumer",
    );
    shopctrl_telemetry::set_parent_from_headers(
        &span,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    span
}

/// How a consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub url: String,
    pub connection_name: String,
    pub queue: String,
    pub consumer_tag: String,
    /// Deliveries the broker sends ahead; at least `concurrency`.
    pub prefetch: u16,
    /// Deliveries handled at the same time. 1 keeps the queue's order; more trades order
    /// for throughput on one connection (instead of one connection, and one I/O thread of
    /// the AMQP client, per parallel consumer).
    pub concurrency: u16,
    /// Tries for a [`Handled::Failed`] message before it is dead-lettered.
    pub max_attempts: u32,
    /// Where dead letters go: (exchange, routing key). They carry the reason in the
    /// `x-dead-letter-reason` header.
    pub dead_letter: (String, String),
    /// Upper bound of the pause between retries of a transient failure.
    pub max_backoff: Duration,
}

/// Why the consumer stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("consumer failed: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the consumer stream")]
    StreamEnded,
    #[error("the dead-letter publish was not confirmed")]
    DeadLetterUnconfirmed,
}

type DeclareFuture<'a> = Pin<Box<dyn Future<Output = Result<(), TopologyError>> + Send + 'a>>;

/// Consumes `config.queue` (one message at a time, which keeps per-queue order, or
/// `config.concurrency` at a time) until `shutdown` is cancelled, reconnecting with backoff when the broker goes away. `declare`
/// runs on every (re)connection before consuming, so the topology is always in place.
///
/// A message is acked only after the handler returned [`Handled::Ack`]; on shutdown the
/// messages in hand are finished first.
pub async fn run_consumer<D, H, Fut>(
    config: ConsumerConfig,
    declare: D,
    handler: H,
    shutdown: CancellationToken,
) where
    D: for<'a> Fn(&'a Channel) -> DeclareFuture<'a>,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = Handled>,
{
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match consume_once(&config, &declare, &handler, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(queue = %config.queue, %error, ?backoff, "consumer lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

async fn consume_once<D, H, Fut>(
    config: &ConsumerConfig,
    declare: &D,
    handler: &H,
    shutdown: &CancellationToken,
) -> Result<(), ConsumeError>
where
    D: for<'a> Fn(&'a Channel) -> DeclareFuture<'a>,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = Handled>,
{
    let connection = connect(&config.url, &config.connection_name).await?;
    let channel = connection.create_channel().await?;
    declare(&channel).await?;
    // Dead letters are published on a separate confirm channel so the consuming channel's
    // acks never wait behind a publish.
    let dead_letters = connection.create_channel().await?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(
            config.prefetch.max(config.concurrency),
            BasicQosOptions::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            config.consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %config.queue, "consuming");

    let concurrency = usize::from(config.concurrency.max(1));
    let mut in_hand = futures::stream::FuturesUnordered::new();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => None,
            Some(done) = in_hand.next(), if !in_hand.is_empty() => {
                done?;
                continue;
            }
            next = consumer.next(), if in_hand.len() < concurrency => Some(next),
        };
        let delivery = match next {
            None => {
                // Stop taking work (unacked prefetched messages go back to the queue), finish
                // what is in hand, then leave.
                let _ = channel
                    .basic_cancel(
                        config.consumer_tag.as_str().into(),
                        BasicCancelOptions::default(),
                    )
                    .await;
                while let Some(done) = in_hand.next().await {
                    done?;
                }
                let _ = channel.close(200, "shutdown".into()).await;
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            Some(None) => {
                return Err(ConsumeError::StreamEnded);
            }
            Some(Some(delivery)) => delivery?,
        };
        in_hand.push(handle_delivery(
            config,
            handler,
            &dead_letters,
            delivery,
            shutdown,
        ));
    }
}

async fn handle_delivery<H, Fut>(
    config: &ConsumerConfig,
    handler: &H,
    dead_letters: &Channel,
    delivery: Delivery,
    shutdown: &CancellationToken,
) -> Result<(), ConsumeError>
where
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = Handled>,
{
    let mut attempt: u32 = 1;
    let mut backoff = Duration::from_millis(50);
    loop {
        let incoming = Incoming::from_delivery(&delivery, attempt);
        let span = consume_span(
            &config.queue,
            incoming.message_id.as_deref(),
            &incoming.headers,
            attempt,
        );
        let outcome = handler(incoming).instrument(span).await;
        match outcome {
            Handled::Ack => {
                delivery.ack(BasicAckOptions::default()).await?;
                return Ok(());
            }
            Handled::Poison(reason) => {
                return dead_letter(config, dead_letters, &delivery, &reason).await;
            }
            Handled::Failed(reason) if attempt >= config.max_attempts => {
                return dead_letter(config, dead_letters, &delivery, &reason).await;
            }
            Handled::Failed(reason) => {
                tracing::warn!(queue = %config.queue, attempt, %reason, "message failed; retrying");
                attempt += 1;
            }
            Handled::Transient(error) => {
                tracing::warn!(queue = %config.queue, %error, ?backoff, "infrastructure error; pausing this queue");
                if shutdown.is_cancelled() {
                    // Give the message back unharmed; another replica or the restart takes it.
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await?;
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

async fn dead_letter(
    config: &ConsumerConfig,
    dead_letters: &Channel,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), ConsumeError> {
    tracing::error!(queue = %config.queue, %reason, "dead-lettering message");
    let mut headers = headers_to_pairs(delivery.properties.headers().as_ref());
    headers.push(("x-dead-letter-reason".into(), reason.to_owned()));
    headers.push(("x-original-queue".into(), config.queue.clone()));
    headers.push(("x-dead-lettered-at".into(), chrono::Utc::now().to_rfc3339()));
    let mut properties: BasicProperties = delivery.properties.clone();
    properties = properties.with_headers(pairs_to_table(&headers));
    let confirm = dead_letters
        .basic_publish(
            config.dead_letter.0.as_str().into(),
            config.dead_letter.1.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => {
            delivery.ack(BasicAckOptions::default()).await?;
            Ok(())
        }
        // Without a confirmed dead letter the message must not be dropped: reconnect and retry.
        _ => Err(ConsumeError::DeadLetterUnconfirmed),
    }
}
