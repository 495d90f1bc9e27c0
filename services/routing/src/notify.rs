//! Employee event streams. Events are stored with the change they report, numbered per
//! employee right after that commits ([`crate::sequencer`]) and announced through RabbitMQ's
//! notify exchange by the outbox, many per message, so any replica can serve any employee: each
//! replica binds its own transient queue and hands announcements to the local subscribers of
//! that employee.
//!
//! A subscriber first gets what it missed (sequence > after_sequence) from PostgreSQL, then the
//! live announcements. PostgreSQL stays the source of truth: a gap in the live sequence, a
//! lagging subscriber or a lost announcement is filled from the table (and a periodic check
//! catches the last event of a burst), so a reconnecting agent misses nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    ExchangeKind,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use prost::Message as _;
use shopctrl_amqp::{Names, QueueSpec, TopologyError, connect, declare_exchange, declare_queue};
use shopctrl_proto::v1::{EmployeeEvent, NotificationBatch};
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// The routing key of numbered employee events' announcements (`NotificationBatch`).
pub const EMPLOYEE_EVENTS_ROUTING_KEY: &str = "employees";

/// How often a live stream re-checks PostgreSQL for events whose announcement it missed.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(2);

/// Local subscribers by employee.
#[derive(Clone, Default)]
pub struct Hub {
    senders: Arc<Mutex<HashMap<String, broadcast::Sender<EmployeeEvent>>>>,
}

impl Hub {
    pub fn subscribe(&self, employee_id: &str) -> broadcast::Receiver<EmployeeEvent> {
        let mut senders = match self.senders.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        senders
            .entry(employee_id.to_owned())
            .or_insert_with(|| broadcast::channel(256).0)
            .subscribe()
    }

    /// Whether anyone here streams for `employee_id` (announcements for others are skipped
    /// before they are decoded).
    pub fn listens(&self, employee_id: &str) -> bool {
        let senders = match self.senders.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        senders.contains_key(employee_id)
    }

    pub fn deliver(&self, event: EmployeeEvent) {
        let mut senders = match self.senders.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(sender) = senders.get(&event.employee_id) {
            if sender.receiver_count() == 0 {
                senders.remove(&event.employee_id);
            } else {
                let _ = sender.send(event);
            }
        }
    }
}

/// Declares the notify exchange.
pub async fn declare_notify(channel: &lapin::Channel, names: &Names) -> Result<(), TopologyError> {
    // No catch-all queue: announcements are published without `mandatory` (the outbox relay
    // is told so); while no routing replica listens, nobody streams, and they are dropped.
    declare_exchange(channel, &names.notify_exchange(), ExchangeKind::Topic).await
}

/// Feeds the hub from the notify exchange until `shutdown`, reconnecting with backoff.
pub async fn run_listener(amqp_url: String, names: Names, hub: Hub, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        if let Err(error) = listen(&amqp_url, &names, &hub, &shutdown).await {
            tracing::warn!(%error, ?backoff, "notification listener lost; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker ended the stream")]
    Ended,
}

async fn listen(
    amqp_url: &str,
    names: &Names,
    hub: &Hub,
    shutdown: &CancellationToken,
) -> Result<(), ListenError> {
    let connection = connect(amqp_url, "routing notifications").await?;
    let channel = connection.create_channel().await?;
    declare_notify(&channel, names).await?;
    let queue = names.custom(&format!(
        "messaging.notify.routing.{}",
        uuid::Uuid::new_v4().simple()
    ));
    declare_queue(
        &channel,
        &QueueSpec::transient(queue.clone())
            .bind(names.notify_exchange(), EMPLOYEE_EVENTS_ROUTING_KEY),
    )
    .await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "routing-notify".into(),
            // Announcements are only a wake-up: PostgreSQL holds the events.
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            next = consumer.next() => next,
        };
        let delivery = next.ok_or(ListenError::Ended)??;
        let Ok(batch) = NotificationBatch::decode(delivery.data.as_slice()) else {
            tracing::warn!("undecodable announcement ignored");
            continue;
        };
        for notification in batch.notifications {
            if !hub.listens(&notification.employee_id) {
                continue;
            }
            match EmployeeEvent::decode(notification.employee_event.as_slice()) {
                Ok(event) => hub.deliver(event),
                Err(error) => tracing::warn!(%error, "undecodable employee event ignored"),
            }
        }
    }
}

/// Events of `employee_id` after `after`, oldest first (at most `limit`).
pub async fn events_after(
    pool: &PgPool,
    employee_id: &str,
    after: u64,
    limit: i64,
) -> Result<Vec<EmployeeEvent>, sqlx::Error> {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "select event from employee_events where employee_id = $1 and sequence > $2
         order by sequence limit $3",
    )
    .bind(employee_id)
    .bind(i64::try_from(after).unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .filter_map(|bytes| EmployeeEvent::decode(bytes.as_slice()).ok())
        .collect())
}

/// The employee's latest sequence (0 when they have none).
pub async fn latest_sequence(pool: &PgPool, employee_id: &str) -> Result<u64, sqlx::Error> {
    let latest: Option<i64> =
        sqlx::query_scalar("select last_sequence from employee_sequences where employee_id = $1")
            .bind(employee_id)
            .fetch_optional(pool)
            .await?;
    Ok(latest.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
}

/// Why a stream ended.
#[derive(Debug)]
pub enum StreamEnd {
    ClientGone,
    Database(sqlx::Error),
    Shutdown,
}

/// Replays then forwards one employee's events into `out` until the client leaves or the
/// service shuts down. `after == 0` starts live.
pub async fn serve_stream(
    pool: PgPool,
    hub: Hub,
    employee_id: String,
    after: u64,
    out: mpsc::Sender<EmployeeEvent>,
    shutdown: CancellationToken,
) -> StreamEnd {
    // Subscribe before reading the table, so nothing committed in between is lost.
    let mut live = hub.subscribe(&employee_id);
    let mut last = if after == 0 {
        match latest_sequence(&pool, &employee_id).await {
            Ok(n) => n,
            Err(error) => return StreamEnd::Database(error),
        }
    } else {
        after
    };
    if let Err(end) = catch_up(&pool, &employee_id, &mut last, &out).await {
        return end;
    }
    let mut tick = tokio::time::interval(CATCH_UP_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return StreamEnd::Shutdown,
            _ = out.closed() => return StreamEnd::ClientGone,
            _ = tick.tick() => {
                if let Err(end) = catch_up(&pool, &employee_id, &mut last, &out).await {
                    return end;
                }
            }
            received = live.recv() => match received {
                Ok(event) if event.sequence <= last => {}
                Ok(event) if event.sequence == last + 1 => {
                    last = event.sequence;
                    if out.send(event).await.is_err() {
                        return StreamEnd::ClientGone;
                    }
                }
                // A gap (announcements overtook each other) or a lagging receiver: the table
                // has everything in order.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Err(end) = catch_up(&pool, &employee_id, &mut last, &out).await {
                        return end;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    live = hub.subscribe(&employee_id);
                }
            }
        }
    }
}

async fn catch_up(
    pool: &PgPool,
    employee_id: &str,
    last: &mut u64,
    out: &mpsc::Sender<EmployeeEvent>,
) -> Result<(), StreamEnd> {
    loop {
        let events = events_after(pool, employee_id, *last, 500)
            .await
            .map_err(StreamEnd::Database)?;
        let full = events.len() == 500;
        for event in events {
            *last = event.sequence;
            if out.send(event).await.is_err() {
                return Err(StreamEnd::ClientGone);
            }
        }
        if !full {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(employee_id: &str, sequence: u64) -> EmployeeEvent {
        EmployeeEvent {
            sequence,
            employee_id: employee_id.to_owned(),
            occurred_at: None,
            event: None,
        }
    }

    #[test]
    fn the_hub_listens_only_for_employees_streaming_here() {
        let hub = Hub::default();
        assert!(!hub.listens("alice"));
        let mut alice = hub.subscribe("alice");
        assert!(hub.listens("alice"));
        assert!(!hub.listens("bob"));
        hub.deliver(event("alice", 1));
        hub.deliver(event("bob", 1));
        assert_eq!(alice.try_recv().map(|e| e.sequence).ok(), Some(1));
        assert!(alice.try_recv().is_err(), "nothing of bob's");
        // A stream that ended is forgotten on the next delivery.
        drop(alice);
        hub.deliver(event("alice", 2));
        assert!(!hub.listens("alice"));
    }
}
