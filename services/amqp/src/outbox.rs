//! The transactional outbox: an event that must follow a database change is inserted into the
//! `outbox` table in the same transaction as the change, and a relay publishes it with
//! confirms and only then deletes the row. A crash between commit and publish therefore delays
//! the event instead of losing it; consumers deduplicate on the event id (the AMQP message id),
//! because a crash between confirm and delete publishes it twice.
//!
//! Each service that uses it owns a table of this shape in its own schema:
//!
//! ```sql
//! create table outbox (
//!     outbox_id    bigserial primary key,
//!     event_id     uuid not null unique,
//!     exchange     text not null,
//!     routing_key  text not null,
//!     message_type text not null,
//!     payload      bytea not null,
//!     headers      jsonb not null default '[]',
//!     created_at   timestamptz not null default now()
//! );
//! ```

use std::time::Duration;

use futures::future::join_all;
use sqlx::{PgConnection, PgPool, Row, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::publisher::{Outgoing, PublishError, Publisher};

/// The `LISTEN` channel that wakes the relay as soon as a transaction commits an event.
const NOTIFY_CHANNEL: &str = "shopctrl_outbox";

/// Why the outbox could not store or relay.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox headers are not valid JSON: {0}")]
    Headers(#[from] serde_json::Error),
    #[error("publishing an outbox event failed: {0}")]
    Publish(#[from] PublishError),
}

/// An event waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub event_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub message_type: String,
    pub payload: Vec<u8>,
    /// String headers; the current trace context is added by [`enqueue`].
    pub headers: Vec<(String, String)>,
}

/// Stores `message` in the outbox inside the caller's transaction. Nothing is published
/// until that transaction commits.
pub async fn enqueue(conn: &mut PgConnection, message: &OutboxMessage) -> Result<(), OutboxError> {
    let mut message = message.clone();
    message.headers.extend(shopctrl_telemetry::inject_current());
    enqueue_many(conn, std::slice::from_ref(&message)).await
}

/// Stores several messages in one statement (and one wake-up), in the order given. Unlike
/// [`enqueue`], each message keeps exactly the headers it carries (none added here).
pub async fn enqueue_many(
    conn: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<(), OutboxError> {
    if messages.is_empty() {
        return Ok(());
    }
    let batch = OutboxBatch::new(messages)?;
    let sql = format!("with {} {}", OutboxBatch::cte(1), OutboxBatch::wake(1));
    batch
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Outbox rows as one `insert … select * from unnest(…)`, for callers that store their own
/// rows in the same statement (`with <their CTEs>, {cte} {wake}`): every round trip counts
/// while a transaction holds row locks until commit.
pub struct OutboxBatch<'a> {
    event_ids: Vec<Uuid>,
    exchanges: Vec<&'a str>,
    routing_keys: Vec<&'a str>,
    types: Vec<&'a str>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<serde_json::Value>,
}

impl<'a> OutboxBatch<'a> {
    pub fn new(messages: &'a [OutboxMessage]) -> Result<Self, OutboxError> {
        let mut batch = Self {
            event_ids: Vec::with_capacity(messages.len()),
            exchanges: Vec::with_capacity(messages.len()),
            routing_keys: Vec::with_capacity(messages.len()),
            types: Vec::with_capacity(messages.len()),
            payloads: Vec::with_capacity(messages.len()),
            headers: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            batch.event_ids.push(message.event_id);
            batch.exchanges.push(&message.exchange);
            batch.routing_keys.push(&message.routing_key);
            batch.types.push(&message.message_type);
            batch.payloads.push(&message.payload);
            batch.headers.push(serde_json::to_value(&message.headers)?);
        }
        Ok(batch)
    }

    /// The CTE `outbox_rows` that inserts the rows, its arrays bound from `$first`.
    pub fn cte(first: usize) -> String {
        let p: Vec<String> = (first..first + 6).map(|n| format!("${n}")).collect();
        format!(
            "outbox_rows as (
                insert into outbox (event_id, exchange, routing_key, message_type, payload, headers)
                select * from unnest({}::uuid[], {}::text[], {}::text[], {}::text[], {}::bytea[],
                                     {}::jsonb[]))",
            p[0], p[1], p[2], p[3], p[4], p[5]
        )
    }

    /// The statement's final `select`: wakes the relay, on commit only, so it never wakes for
    /// a rolled-back event.
    pub fn wake(first: usize) -> String {
        format!("select pg_notify(${}, '')", first + 6)
    }

    /// Binds the arrays and the wake-up channel, in the order `cte` and `wake` expect.
    pub fn bind(
        self,
        query: sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.event_ids)
            .bind(self.exchanges)
            .bind(self.routing_keys)
            .bind(self.types)
            .bind(self.payloads)
            .bind(self.headers)
            .bind(NOTIFY_CHANNEL)
    }
}

/// Publishes committed outbox rows, oldest first, and deletes each once confirmed.
#[derive(Clone)]
pub struct OutboxRelay {
    pool: PgPool,
    publisher: Publisher,
    batch_size: i64,
    poll_interval: Duration,
    mandatory: bool,
    /// Exchanges whose events are announcements: published without `mandatory`.
    announcement_exchanges: Vec<String>,
}

impl OutboxRelay {
    pub fn new(pool: PgPool, publisher: Publisher) -> Self {
        Self {
            pool,
            publisher,
            batch_size: 256,
            poll_interval: Duration::from_millis(500),
            mandatory: true,
            announcement_exchanges: Vec::new(),
        }
    }

    /// Whether an event no queue is bound for is an error (the default: the row stays and is
    /// retried). Fan-out notifications such as config changes turn it off: with no listener
    /// bound there is no cache to drop, and the row would otherwise be retried forever.
    pub fn with_mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Events to `exchanges` are announcements whose truth is stored elsewhere (employee
    /// event streams read PostgreSQL): with no listener bound they are simply dropped, while
    /// every other exchange keeps the default.
    pub fn with_announcement_exchanges(mut self, exchanges: Vec<String>) -> Self {
        self.announcement_exchanges = exchanges;
        self
    }

    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Relays one batch; returns how many events were published. Rows are locked with
    /// `skip locked`, so several replicas relay side by side without publishing a row twice.
    pub async fn relay_once(&self) -> Result<usize, OutboxError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "select outbox_id, event_id, exchange, routing_key, message_type, payload, headers
             from outbox order by outbox_id limit $1 for update skip locked",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let headers: Vec<(String, String)> =
                serde_json::from_value(row.try_get::<serde_json::Value, _>("headers")?)?;
            pending.push((
                row.try_get::<i64, _>("outbox_id")?,
                row.try_get::<Uuid, _>("event_id")?.to_string(),
                row.try_get::<String, _>("exchange")?,
                row.try_get::<String, _>("routing_key")?,
                row.try_get::<String, _>("message_type")?,
                row.try_get::<Vec<u8>, _>("payload")?,
                headers,
            ));
        }
        // All publishes of the batch are in flight at once: the broker confirms them together.
        let results = join_all(pending.iter().map(
            |(_, event_id, exchange, routing_key, message_type, payload, headers)| {
                self.publisher.publish(Outgoing {
                    exchange,
                    routing_key,
                    message_type,
                    message_id: event_id,
                    payload,
                    headers,
                    mandatory: self.mandatory && !self.announcement_exchanges.contains(exchange),
                })
            },
        ))
        .await;
        let mut published = Vec::with_capacity(pending.len());
        let mut first_error = None;
        for ((outbox_id, ..), result) in pending.iter().zip(results) {
            match result {
                Ok(()) => published.push(*outbox_id),
                Err(error) => {
                    if first_error.is_none() {
                        first_error = Some(error);
                    }
                }
            }
        }
        sqlx::query("delete from outbox where outbox_id = any($1)")
            .bind(&published)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(published.len()),
        }
    }

    /// Number of events not yet published (for the `outbox_pending` gauge).
    pub async fn pending(&self) -> Result<i64, OutboxError> {
        Ok(sqlx::query_scalar("select count(*) from outbox")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Relays until `shutdown`, woken by commits (LISTEN/NOTIFY) and by a poll as a safety net.
    /// On shutdown it relays what is left once more before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let full = usize::try_from(self.batch_size).unwrap_or(usize::MAX);
        let wake = Wake {
            pool: &self.pool,
            channel: NOTIFY_CHANNEL,
            poll_interval: self.poll_interval,
            what: "outbox relay",
        };
        wake.drive(full, &shutdown, || self.relay_once()).await;
    }
}

/// How a background step that drains a table is woken: by a NOTIFY on `channel` (sent by the
/// transactions that fill the table, delivered on commit), and by a poll as a safety net.
pub struct Wake<'a> {
    pub pool: &'a PgPool,
    pub channel: &'a str,
    pub poll_interval: Duration,
    /// Names the step in logs.
    pub what: &'a str,
}

impl Wake<'_> {
    /// Runs `step` until `shutdown`: again at once while it returns `full` (more is waiting),
    /// else on the next wake-up; failures are retried with backoff. Once `shutdown` fires it
    /// runs once more, so what committed before is handled, and returns.
    pub async fn drive<F, Fut, E>(&self, full: usize, shutdown: &CancellationToken, mut step: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<usize, E>>,
        E: std::fmt::Display,
    {
        let what = self.what;
        let mut listener = match PgListener::connect_with(self.pool).await {
            Ok(mut listener) => match listener.listen(self.channel).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, what, "LISTEN failed; polling only");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, what, "LISTEN failed; polling only");
                None
            }
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match step().await {
                Ok(n) if n == full => continue,
                Ok(_) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(%error, what, ?backoff, "failed; will retry");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            let wait = tokio::time::sleep(self.poll_interval);
            match listener.as_mut() {
                Some(listener) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = wait => {}
                        notification = listener.recv() => {
                            if let Err(error) = notification {
                                tracing::debug!(%error, what, "listener interrupted");
                            }
                        }
                    }
                }
                None => {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = wait => {}
                    }
                }
            }
        }
    }
}
