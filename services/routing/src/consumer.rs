//! The inbound shard consumers. One task per shard queue; each queue is a quorum queue with a
//! single active consumer, so with any number of replicas exactly one consumer applies a
//! shard's events, in queue order. For throughput, a consumer takes what is already prefetched
//! (up to the batch size), applies it in ONE transaction (each event inside a savepoint, so one
//! bad event does not undo the others), commits, and then acks the whole batch with one
//! `multiple` ack. Per-message acks cost 3-4x in broker and client CPU (LIMITS.md Q8 vs Q10).
//! The batch's waiting conversations are claimed for just before that commit (the claims are
//! pending in Redis, recorded in the same transaction, confirmed after it), so a new
//! conversation's assignment costs no transaction of its own.
//!
//! Failure handling:
//! - infrastructure errors (database, config service unreachable) roll the batch back, pause
//!   the shard with backoff and retry the same events in the same order, forever;
//! - an event that cannot be decoded, or that violates a rule on each of its bounded tries, is
//!   published to the dead-letter exchange with the reason (confirmed), then acked with the
//!   batch; the consumer keeps going;
//! - a crash between commit and ack redelivers the batch; every effect is idempotent (message
//!   ids, status ranking, inbox), so the redelivery changes nothing.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Confirmation, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use shopctrl_amqp::{
    Names, QueueSpec, TopologyError, connect, consume_span, declare_exchange, declare_queue,
    headers_to_pairs,
};
use shopctrl_proto::v1::HandoverRequest;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    assign::{AssignError, Assigner, WaitingConversation},
    ingest::{BatchState, FollowUps, Inbound, IngestError, Ingestor},
    metrics::Metrics,
    store,
};

/// What a test (or the benchmark) may observe right after a batch committed, before the ack.
#[derive(Debug, Clone)]
pub struct Committed {
    pub shard: u16,
    /// For each event of the batch: when ingress received it (None if it did not say).
    pub received_at: Vec<Option<DateTime<Utc>>>,
}

/// Called after each commit, before the ack (tests cut the broker connection here).
pub type CommitHook = Arc<dyn Fn(&Committed) + Send + Sync>;

/// Everything a shard consumer needs.
#[derive(Clone)]
pub struct ShardContext {
    pub amqp_url: String,
    pub names: Names,
    pub shards: u16,
    pub prefetch: u16,
    pub batch_size: usize,
    pub max_attempts: u32,
    pub pool: PgPool,
    pub ingestor: Ingestor,
    pub assigner: Arc<dyn Assigner>,
    pub metrics: Metrics,
    pub after_commit: Option<CommitHook>,
    /// Up while shard 0 is consuming (readiness).
    pub broker_ready: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
enum ShardError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the consumer stream")]
    StreamEnded,
    #[error("dead-letter publish not confirmed")]
    DeadLetterUnconfirmed,
}

/// The dead-letter routing key (and DLQ kind) of the inbound queues.
pub const INBOUND_KIND: &str = "inbound";

/// Declares the inbound topology: the exchange, N shard queues, the dead-letter exchange and
/// the inbound dead-letter queue. Idempotent.
pub async fn declare_inbound(
    channel: &Channel,
    names: &Names,
    shards: u16,
) -> Result<(), TopologyError> {
    declare_exchange(channel, &names.inbound_exchange(), ExchangeKind::Direct).await?;
    declare_exchange(channel, &names.dead_letter_exchange(), ExchangeKind::Direct).await?;
    declare_queue(
        channel,
        &QueueSpec::quorum(names.dead_letter_queue(INBOUND_KIND))
            .bind(names.dead_letter_exchange(), INBOUND_KIND),
    )
    .await?;
    for shard in 0..shards {
        declare_queue(
            channel,
            &QueueSpec::quorum(names.inbound_shard_queue(shard))
                .single_active()
                .dead_letter_to(names.dead_letter_exchange(), INBOUND_KIND)
                .bind(names.inbound_exchange(), format!("shard.{shard}")),
        )
        .await?;
    }
    Ok(())
}

/// Runs one shard's consumer until `shutdown`, reconnecting with backoff.
pub async fn run_shard(context: Arc<ShardContext>, shard: u16, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        match consume(&context, shard, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                if shard == 0 {
                    context.broker_ready.store(false, Ordering::SeqCst);
                }
                tracing::warn!(shard, %error, ?backoff, "shard consumer lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracing::info!(shard, "shard consumer stopped");
}

async fn consume(
    context: &ShardContext,
    shard: u16,
    shutdown: &CancellationToken,
) -> Result<(), ShardError> {
    let queue = context.names.inbound_shard_queue(shard);
    let connection = connect(&context.amqp_url, &format!("routing shard {shard}")).await?;
    let channel = connection.create_channel().await?;
    declare_inbound(&channel, &context.names, context.shards).await?;
    let dead_letters = connection.create_channel().await?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(context.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("routing-shard-{shard}-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if shard == 0 {
        context.broker_ready.store(true, Ordering::SeqCst);
    }
    tracing::info!(shard, %queue, "consuming");

    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => None,
            next = consumer.next() => Some(next),
        };
        let first = match first {
            None => {
                // Stop taking work; whatever is prefetched but unacked goes back to the queue.
                let _ = channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
                let _ = channel.close(200, "shutdown".into()).await;
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            Some(None) => return Err(ShardError::StreamEnded),
            Some(Some(delivery)) => delivery?,
        };
        let mut batch = vec![first];
        // Take what is already here, without waiting: an idle shard commits single events at
        // once, a busy one fills its batches.
        while batch.len() < context.batch_size && !is_handover(batch.last()) {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(error))) => return Err(error.into()),
                Some(None) | None => break,
            }
        }
        process_batch(context, shard, &dead_letters, &batch, shutdown).await?;
    }
}

/// A handover ends a batch, so it is handed to the assigner after everything before it is
/// committed and before anything after it is applied.
fn is_handover(delivery: Option<&Delivery>) -> bool {
    delivery
        .and_then(|d| d.properties.kind().as_ref().map(|k| k.as_str().to_owned()))
        .is_some_and(|k| k == store::proto_type("HandoverRequest"))
}

enum Verdict {
    Applied(FollowUps),
    Dead(String),
}

async fn process_batch(
    context: &ShardContext,
    shard: u16,
    dead_letters: &Channel,
    batch: &[Delivery],
    shutdown: &CancellationToken,
) -> Result<(), ShardError> {
    let decoded: Vec<Result<Inbound, String>> = batch
        .iter()
        .map(|d| Inbound::decode(d.properties.kind().as_ref().map(|k| k.as_str()), &d.data))
        .collect();
    // One span per event, child of the ingress span in its headers: the event's own work (and
    // the flow events it causes, whose outbox rows carry the context) joins the webhook's trace.
    let queue = context.names.inbound_shard_queue(shard);
    let spans: Vec<tracing::Span> = batch
        .iter()
        .map(|d| {
            consume_span(
                &queue,
                d.properties.message_id().as_ref().map(|m| m.as_str()),
                &headers_to_pairs(d.properties.headers().as_ref()),
                1,
            )
        })
        .collect();
    let mut backoff = Duration::from_millis(50);
    let mut careful = false;
    let (verdicts, handled) = loop {
        match apply_batch(context, &decoded, &spans, careful).await {
            Ok(Some(done)) => break done,
            // An event failed on the fast path: the same batch again, each event on its own.
            Ok(None) => careful = true,
            Err(error) => {
                context.metrics.event("transient_error", 1);
                tracing::warn!(shard, %error, ?backoff, "infrastructure error; pausing this shard");
                if shutdown.is_cancelled() {
                    // Give the batch back unharmed; the next consumer takes it in order.
                    if let Some(last) = batch.last() {
                        last.nack(BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        })
                        .await?;
                    }
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    if let Some(hook) = &context.after_commit {
        hook(&Committed {
            shard,
            received_at: decoded
                .iter()
                .map(|d| match d {
                    Ok(Inbound::Webhook(e)) => store::from_timestamp(e.received_at.as_ref()),
                    Ok(Inbound::Handover(h)) => store::from_timestamp(h.received_at.as_ref()),
                    Err(_) => None,
                })
                .collect(),
        });
    }

    let mut follow_ups = Vec::new();
    let mut applied = 0u64;
    for ((delivery, verdict), span) in batch.iter().zip(verdicts).zip(&spans) {
        match verdict {
            Verdict::Applied(mut f) => {
                applied += 1;
                f.redelivered = delivery.redelivered;
                follow_ups.push((f, span.clone()));
            }
            Verdict::Dead(reason) => {
                dead_letter(context, dead_letters, delivery, &reason).await?;
            }
        }
    }
    if !run_follow_ups(context, follow_ups, &handled, shutdown).await {
        // Shutting down with the assigner unreachable: give the batch back. The redelivery
        // finds every message stored and asks the assigner again for waiting conversations.
        if let Some(last) = batch.last() {
            last.nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            })
            .await?;
        }
        return Ok(());
    }
    if let Some(last) = batch.last() {
        last.ack(BasicAckOptions { multiple: true }).await?;
    }
    context.metrics.event("applied", applied);
    let now = Utc::now();
    for d in &decoded {
        if let Ok(Inbound::Webhook(e)) = d
            && let Some(at) = store::from_timestamp(e.received_at.as_ref())
        {
            context
                .metrics
                .commit_latency((now - at).num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
    }
    Ok(())
}

/// One transaction over the batch. An `Err` is an infrastructure error: nothing was
/// committed.
///
/// The fast path (`careful` false) applies the events one after the other with no savepoints
/// (two round trips fewer per event); if one of them fails, it rolls everything back and
/// answers `None`. The careful path runs each event in a savepoint with bounded tries, so a
/// failing event is dead-lettered alone and the rest of the batch commits.
async fn apply_batch(
    context: &ShardContext,
    decoded: &[Result<Inbound, String>],
    spans: &[tracing::Span],
    careful: bool,
) -> Result<Option<(Vec<Verdict>, HashSet<uuid::Uuid>)>, IngestError> {
    let mut tx = context.pool.begin().await.map_err(IngestError::from)?;
    let mut state = BatchState::default();
    if !careful {
        let events: Vec<&Inbound> = decoded.iter().filter_map(|e| e.as_ref().ok()).collect();
        context
            .ingestor
            .prefetch(&mut tx, &mut state, &events)
            .await?;
    }
    let mut verdicts = Vec::with_capacity(decoded.len());
    for (event, span) in decoded.iter().zip(spans) {
        let inbound = match event {
            Ok(inbound) => inbound,
            Err(reason) => {
                verdicts.push(Verdict::Dead(reason.clone()));
                continue;
            }
        };
        if !careful {
            match context
                .ingestor
                .apply(&mut tx, &mut state, inbound)
                .instrument(span.clone())
                .await
            {
                Ok(follow_ups) => verdicts.push(Verdict::Applied(follow_ups)),
                Err(IngestError::Transient(error)) => return Err(IngestError::Transient(error)),
                Err(IngestError::Failed(reason)) => {
                    tracing::debug!(%reason, "an event of the batch failed; applying it event by event");
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
            continue;
        }
        let mut attempt = 1;
        let verdict = loop {
            sqlx::query("savepoint event").execute(&mut *tx).await?;
            let gathered = state.events.len();
            // Each event's writes are flushed inside its own savepoint, so a failing one is
            // rolled back alone.
            let applied = match context
                .ingestor
                .apply(&mut tx, &mut state, inbound)
                .instrument(span.clone())
                .await
            {
                Ok(follow_ups) => context
                    .ingestor
                    .flush(&mut tx, &mut state)
                    .instrument(span.clone())
                    .await
                    .map(|()| follow_ups),
                Err(error) => Err(error),
            };
            match applied {
                Ok(follow_ups) => {
                    sqlx::query("release savepoint event")
                        .execute(&mut *tx)
                        .await?;
                    break Verdict::Applied(follow_ups);
                }
                Err(IngestError::Transient(error)) => return Err(IngestError::Transient(error)),
                Err(IngestError::Failed(reason)) => {
                    sqlx::query("rollback to savepoint event")
                        .execute(&mut *tx)
                        .await?;
                    state.events.truncate(gathered);
                    state.discard_deferred();
                    if attempt >= context.max_attempts {
                        break Verdict::Dead(reason);
                    }
                    tracing::warn!(attempt, %reason, "inbound event failed; retrying");
                    attempt += 1;
                }
            }
        };
        verdicts.push(verdict);
    }
    if !careful {
        match context.ingestor.flush(&mut tx, &mut state).await {
            Ok(()) => {}
            Err(IngestError::Transient(error)) => return Err(IngestError::Transient(error)),
            Err(IngestError::Failed(reason)) => {
                tracing::debug!(%reason, "the batch's writes failed; applying it event by event");
                tx.rollback().await?;
                return Ok(None);
            }
        }
    }
    context
        .ingestor
        .sink
        .store_pending(&mut tx, &mut state.events)
        .await?;
    // On the fast path the conversations the batch started are claimed for before the
    // commit, so their assignments commit with the batch. Conversations that were already
    // waiting (asked again as a repair, nearly always refused) and the careful path are
    // left to the follow-ups.
    let mut claims = None;
    if !careful {
        let mut seen = HashSet::new();
        let waiting: Vec<(uuid::Uuid, tracing::Span)> = verdicts
            .iter()
            .zip(spans)
            .filter_map(|(verdict, span)| match verdict {
                Verdict::Applied(f) => Some((f, span)),
                Verdict::Dead(_) => None,
            })
            .flat_map(|(f, span)| f.started.iter().map(move |id| (*id, span.clone())))
            .filter(|(id, _)| seen.insert(*id))
            .collect();
        if !waiting.is_empty() {
            // Claim trouble must not keep the batch's messages from committing: on an error
            // the claims are given back, the batch commits without them and the follow-ups
            // claim as usual.
            sqlx::query("savepoint claims").execute(&mut *tx).await?;
            match context.assigner.claim_in_batch(&mut tx, waiting).await {
                Ok(taken) => claims = taken,
                Err(error) => {
                    tracing::warn!(%error, "claiming inside the batch failed; committing it without its claims");
                    sqlx::query("rollback to savepoint claims")
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
    }
    let committed = tx.commit().await;
    let handled = match claims {
        Some(claims) => claims.settle(committed.is_ok()).await,
        None => HashSet::new(),
    };
    committed?;
    Ok(Some((verdicts, handled)))
}

/// The assigner calls. Infrastructure errors are retried in place until shutdown; false means
/// shutdown came first and the batch must be given back. Other errors are logged: they are
/// answers (the conversation stays in the queue), not outages.
///
/// Waiting conversations are claimed for concurrently (each once, however many of its
/// messages the batch held); handovers then run in order. A handover ends its batch, so it
/// still comes after everything that arrived before it.
async fn run_follow_ups(
    context: &ShardContext,
    follow_ups: Vec<(FollowUps, tracing::Span)>,
    claimed_in_batch: &HashSet<uuid::Uuid>,
    shutdown: &CancellationToken,
) -> bool {
    let (waiting, handovers) = follow_up_work(follow_ups, claimed_in_batch);
    if !waiting.is_empty()
        && !retry(shutdown, || {
            context.assigner.conversations_waiting(waiting.clone())
        })
        .await
    {
        return false;
    }
    for (handover, span) in handovers {
        if !retry(shutdown, || context.assigner.handover(handover.clone()))
            .instrument(span)
            .await
        {
            return false;
        }
    }
    true
}

/// What a batch asks of the assigner after its commit: each waiting conversation once, except
/// those the batch's own claims dealt with, marked as a mere repeat unless its event started
/// it or was delivered before (a crash may have kept the claim of one it started); and the
/// handovers, in order.
fn follow_up_work(
    follow_ups: Vec<(FollowUps, tracing::Span)>,
    claimed_in_batch: &HashSet<uuid::Uuid>,
) -> (
    Vec<WaitingConversation>,
    Vec<(HandoverRequest, tracing::Span)>,
) {
    let mut seen = claimed_in_batch.clone();
    let mut waiting = Vec::new();
    let mut handovers = Vec::new();
    for (follow_ups, span) in follow_ups {
        for conversation_id in follow_ups.waiting {
            if seen.insert(conversation_id) {
                waiting.push(WaitingConversation {
                    conversation_id,
                    shop_id: follow_ups.shop_id.clone(),
                    repeat: !follow_ups.redelivered
                        && !follow_ups.started.contains(&conversation_id),
                    span: span.clone(),
                });
            }
        }
        for handover in follow_ups.handovers {
            handovers.push((handover, span.clone()));
        }
    }
    (waiting, handovers)
}

async fn retry<'a, F>(shutdown: &CancellationToken, mut call: impl FnMut() -> F) -> bool
where
    F: std::future::Future<Output = Result<(), AssignError>> + 'a,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match call().await {
            Ok(()) => return true,
            Err(AssignError::Unavailable(error)) => {
                if shutdown.is_cancelled() {
                    return false;
                }
                tracing::warn!(%error, ?backoff, "assigner unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(error) => {
                tracing::warn!(%error, "assigner refused");
                return true;
            }
        }
    }
}

async fn dead_letter(
    context: &ShardContext,
    channel: &Channel,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), ShardError> {
    tracing::error!(%reason, "dead-lettering inbound event");
    context.metrics.event("dead_lettered", 1);
    context
        .metrics
        .dead_lettered(&context.names.dead_letter_queue(INBOUND_KIND));
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from("x-dead-letter-reason"),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        ShortString::from("x-original-queue"),
        AMQPValue::LongString(delivery.routing_key.as_str().into()),
    );
    headers.insert(
        ShortString::from("x-dead-lettered-at"),
        AMQPValue::LongString(Utc::now().to_rfc3339().as_str().into()),
    );
    let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
    let confirm = channel
        .basic_publish(
            context.names.dead_letter_exchange().as_str().into(),
            INBOUND_KIND.into(),
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
        Confirmation::Ack(None) => Ok(()),
        _ => Err(ShardError::DeadLetterUnconfirmed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow_ups(
        waiting: &[uuid::Uuid],
        started: &[uuid::Uuid],
        redelivered: bool,
    ) -> (FollowUps, tracing::Span) {
        (
            FollowUps {
                shop_id: "shop-a".into(),
                waiting: waiting.to_vec(),
                started: started.to_vec(),
                redelivered,
                handovers: Vec::new(),
            },
            tracing::Span::none(),
        )
    }

    fn repeats(work: &[WaitingConversation]) -> Vec<(uuid::Uuid, bool)> {
        work.iter().map(|w| (w.conversation_id, w.repeat)).collect()
    }

    #[test]
    fn only_a_first_delivery_of_a_further_message_is_a_mere_repeat() {
        let [started, further, redelivered] = [(); 3].map(|()| uuid::Uuid::now_v7());
        let (work, _) = follow_up_work(
            vec![
                follow_ups(&[started], &[started], false),
                follow_ups(&[further], &[], false),
                follow_ups(&[redelivered], &[], true),
            ],
            &HashSet::new(),
        );
        assert_eq!(
            repeats(&work),
            [(started, false), (further, true), (redelivered, false)]
        );
    }

    #[test]
    fn each_conversation_is_asked_once_and_not_after_the_batch_claimed_it() {
        let [a, b, claimed] = [(); 3].map(|()| uuid::Uuid::now_v7());
        let (work, _) = follow_up_work(
            vec![
                follow_ups(&[a, claimed], &[a, claimed], false),
                follow_ups(&[a, b], &[], false),
                follow_ups(&[b], &[], true),
            ],
            &HashSet::from([claimed]),
        );
        // The first event to name a conversation decides how it is asked.
        assert_eq!(repeats(&work), [(a, false), (b, true)]);
    }
}
