//! Numbers employee events after the transaction that caused them committed. Each employee's
//! events carry consecutive sequence numbers (a reconnecting agent resumes after the last one
//! it saw), so numbering needs the employee's counter; done inside the causing transaction,
//! that counter row stayed locked until commit and shards with events for the same employee
//! queued behind each other. Here one transaction at a time (an advisory lock, across
//! replicas) numbers everything committed so far, stores the numbered events and queues their
//! announcements in the outbox, a few hundred events per message.
//!
//! Order: one conversation's events come from transactions that commit one after the other
//! (its shard, or the API after the row lock), so they are read, and numbered, in that order.

use std::{collections::HashMap, time::Duration};

use prost::Message as _;
use shopctrl_amqp::{OutboxBatch, Wake};
use shopctrl_proto::v1::{EmployeeEvent, Notification};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::store::{Sink, StoreError};

/// The LISTEN/NOTIFY channel a transaction that stored events wakes the sequencer on.
pub const WAKE_CHANNEL: &str = "routing_employee_events";

/// The advisory lock that makes one sequencer run at a time per database.
const SEQUENCER_LOCK: i64 = 0x7365_7175_656e_6365;

/// How many events one numbering transaction takes.
const BATCH: i64 = 1000;

/// How many events one announcement message carries at most.
pub const ANNOUNCEMENT_EVENTS: usize = 250;

/// How many bytes of events one announcement message carries at most, so a message stays far
/// below the broker's size limit and a backlog the relay reads at once stays small in memory.
/// An event larger than this alone is not announced: its stream finds the gap in the sequence
/// (or re-reads the table within seconds) and reads it from PostgreSQL.
pub const ANNOUNCEMENT_BYTES: usize = 128 * 1024;

/// Numbers and announces stored employee events.
#[derive(Clone)]
pub struct Sequencer {
    pool: PgPool,
    sink: Sink,
    poll_interval: Duration,
}

impl Sequencer {
    pub fn new(pool: PgPool, sink: Sink) -> Self {
        Self {
            pool,
            sink,
            poll_interval: Duration::from_millis(500),
        }
    }

    /// One numbering transaction; returns how many events it numbered. Without `wait` it
    /// gives up at once when another sequencer holds the lock (that one numbers these events
    /// too): a replica shutting down does not wait for another.
    pub async fn number_once(&self, wait: bool) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Its own statement, before the read: the read's snapshot must be taken after the
        // previous holder committed, or it would see events that holder already numbered.
        let locked: bool = sqlx::query_scalar(if wait {
            "select pg_advisory_xact_lock($1) is not null"
        } else {
            "select pg_try_advisory_xact_lock($1)"
        })
        .bind(SEQUENCER_LOCK)
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            tx.rollback().await?;
            return Ok(0);
        }
        let rows = sqlx::query(
            "select u.id, u.employee_id, u.shop_id, u.event,
                    coalesce(s.last_sequence, 0) as last_sequence
             from (select * from employee_events_unnumbered order by id limit $1) u
             left join employee_sequences s on s.employee_id = u.employee_id
             order by u.id",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let mut next: HashMap<String, i64> = HashMap::new();
        let mut ids = Vec::with_capacity(rows.len());
        let mut employee_ids = Vec::with_capacity(rows.len());
        let mut sequences = Vec::with_capacity(rows.len());
        let mut shop_ids = Vec::with_capacity(rows.len());
        let mut stored = Vec::with_capacity(rows.len());
        let mut announced = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let employee_id: String = row.try_get("employee_id")?;
            let shop_id: String = row.try_get("shop_id")?;
            let last: i64 = row.try_get("last_sequence")?;
            let sequence = next.entry(employee_id.clone()).or_insert(last);
            *sequence += 1;
            let sequence = *sequence;
            let bytes: Vec<u8> = row.try_get("event")?;
            let mut event = EmployeeEvent::decode(bytes.as_slice())
                .map_err(|error| StoreError::Event(format!("event {id}: {error}")))?;
            event.sequence = u64::try_from(sequence).unwrap_or(0);
            let bytes = event.encode_to_vec();
            announced.push(Notification {
                meta: None,
                shop_id: shop_id.clone(),
                employee_id: employee_id.clone(),
                sequence: event.sequence,
                employee_event: bytes.clone(),
            });
            ids.push(id);
            employee_ids.push(employee_id);
            sequences.push(sequence);
            shop_ids.push(shop_id);
            stored.push(bytes);
        }
        // A few messages per numbering batch, not one per event: the broker's and the
        // relay's cost is per message.
        let outbox: Vec<_> = announcement_chunks(announced)
            .into_iter()
            .map(|chunk| self.sink.notification_batch_message(chunk))
            .collect();
        let (counter_ids, counters): (Vec<String>, Vec<i64>) = next.into_iter().unzip();
        let sql = format!(
            "with counters as (
                insert into employee_sequences (employee_id, last_sequence)
                select * from unnest($1::text[], $2::bigint[])
                on conflict (employee_id) do update set last_sequence = excluded.last_sequence
             ),
             numbered as (
                insert into employee_events (employee_id, sequence, shop_id, event)
                select * from unnest($3::text[], $4::bigint[], $5::text[], $6::bytea[])
             ),
             taken as (
                delete from employee_events_unnumbered where id = any($7)
             ), {} {}",
            OutboxBatch::cte(8),
            OutboxBatch::wake(8)
        );
        let query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(counter_ids)
            .bind(counters)
            .bind(employee_ids)
            .bind(sequences)
            .bind(shop_ids)
            .bind(stored)
            .bind(ids);
        OutboxBatch::new(&outbox)?
            .bind(query)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Events committed but not numbered yet (for the `routing_employee_events_unnumbered`
    /// gauge).
    pub async fn pending(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("select count(*) from employee_events_unnumbered")
            .fetch_one(&self.pool)
            .await
    }

    /// Numbers until `shutdown`, woken by commits that stored events (LISTEN/NOTIFY) and by a
    /// poll as a safety net; on shutdown it numbers what is left once more before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let wake = Wake {
            pool: &self.pool,
            channel: WAKE_CHANNEL,
            poll_interval: self.poll_interval,
            what: "employee event sequencer",
        };
        let full = usize::try_from(BATCH).unwrap_or(usize::MAX);
        wake.drive(full, &shutdown, || {
            self.number_once(!shutdown.is_cancelled())
        })
        .await;
    }
}

/// Splits numbered events' announcements into messages of at most [`ANNOUNCEMENT_EVENTS`]
/// events and [`ANNOUNCEMENT_BYTES`] bytes of events, keeping their order.
pub fn announcement_chunks(announced: Vec<Notification>) -> Vec<Vec<Notification>> {
    let mut chunks: Vec<Vec<Notification>> = Vec::new();
    let mut bytes = 0;
    for notification in announced {
        let size = notification.employee_event.len();
        if size > ANNOUNCEMENT_BYTES {
            continue;
        }
        match chunks.last_mut() {
            Some(chunk)
                if chunk.len() < ANNOUNCEMENT_EVENTS && bytes + size <= ANNOUNCEMENT_BYTES =>
            {
                bytes += size;
                chunk.push(notification);
            }
            _ => {
                bytes = size;
                chunks.push(vec![notification]);
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced(sequence: u64, bytes: usize) -> Notification {
        Notification {
            meta: None,
            shop_id: "shop".into(),
            employee_id: "e".into(),
            sequence,
            employee_event: vec![0; bytes],
        }
    }

    fn sequences(chunks: &[Vec<Notification>]) -> Vec<Vec<u64>> {
        chunks
            .iter()
            .map(|chunk| chunk.iter().map(|n| n.sequence).collect())
            .collect()
    }

    #[test]
    fn chunks_hold_at_most_250_events() {
        let chunks = announcement_chunks((1..=501).map(|n| announced(n, 10)).collect());
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [250, 250, 1]);
        let flat: Vec<u64> = sequences(&chunks).concat();
        assert_eq!(flat, (1..=501).collect::<Vec<u64>>(), "order kept");
    }

    #[test]
    fn chunks_hold_at_most_128_kib_of_events_and_oversized_ones_are_left_out() {
        let third = ANNOUNCEMENT_BYTES / 3;
        let chunks = announcement_chunks(vec![
            announced(1, third),
            announced(2, third),
            announced(3, third),
            announced(4, third),
            announced(5, ANNOUNCEMENT_BYTES + 1),
            announced(6, ANNOUNCEMENT_BYTES),
            announced(7, 1),
        ]);
        assert_eq!(
            sequences(&chunks),
            [vec![1, 2, 3], vec![4], vec![6], vec![7]]
        );
        assert!(announcement_chunks(Vec::new()).is_empty());
    }
}
