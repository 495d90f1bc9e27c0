//! Replay memory: a verified token's `jti` (or a legacy signature) is remembered after its
//! publish was confirmed, for the token's remaining lifetime plus leeway. A request that
//! reuses it is answered 200 and not published again.
//!
//! The server does not wait for that write: once the broker confirmed, the answer goes out and
//! the write follows in the next pipeline. Any later check of the same key in this process is
//! queued after it, so it still sees the key; a replay that reaches another replica within
//! that moment (about one Redis round trip) is published again, as routing tolerates. At
//! shutdown the server waits (briefly) for the writes still queued ([`ReplayDrained`]).
//!
//! The store fails open: when Redis is unreachable the request is published anyway (and the
//! failure counted), because a replayed event is harmless downstream (routing deduplicates by
//! event id) while refusing genuine webhooks during a Redis outage would lose availability.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use redis::{Value, aio::ConnectionManager};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// Why the replay store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// Remembers seen token ids.
pub trait ReplayStore: Send + Sync + 'static {
    fn seen<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, ReplayError>>;
    fn remember<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>>;
    /// Queues `remember` without waiting for it. An error here means it was not even queued;
    /// a failure of the write itself is counted and logged by the store.
    fn remember_in_background(&self, key: &str, ttl: Duration) -> Result<(), ReplayError>;
}

/// The most operations sent to Redis in one pipeline.
const MAX_BATCH: usize = 512;

/// One request to the batcher, with where its answer goes.
enum Op {
    Seen {
        key: String,
        reply: oneshot::Sender<Result<bool, ReplayError>>,
    },
    Remember {
        key: String,
        seconds: u64,
        /// `None` for a write nobody waits for.
        reply: Option<oneshot::Sender<Result<(), ReplayError>>>,
        /// A background write's place among those queued, given back when it is answered.
        _place: Option<OwnedSemaphorePermit>,
    },
}

/// Redis-backed store; keys are `<prefix>replay:<key>`.
///
/// Every webhook asks Redis twice (before the publish and after its confirm). Sent one by
/// one, those round trips cost ingress about a quarter of its throughput in socket work, so
/// one task sends whatever has queued up as a single pipeline: one write and one read for
/// all requests waiting at that moment, one command each, answers in order.
///
/// Writes queued in the background that fail are counted in `background_failures`.
pub struct RedisReplay {
    ops: mpsc::Sender<Op>,
    drained: Option<ReplayDrained>,
    timeout: Duration,
    /// Background writes queued at most at once: nobody waits for them, so without a bound a
    /// slow Redis would let them fill the queue that the checks need.
    background: Arc<Semaphore>,
}

impl RedisReplay {
    /// Starts the batching task; does not connect yet: ingress starts while Redis is down.
    /// Must be called inside a Tokio runtime. The task ends when the store is dropped.
    pub fn start(
        url: &str,
        prefix: &str,
        timeout: Duration,
        background_failures: Counter,
    ) -> Result<Self, ReplayError> {
        let client = redis::Client::open(url).map_err(|e| ReplayError::Redis(e.to_string()))?;
        // Bounded: when Redis stalls, further requests are answered with an error at once
        // (and publish without the check) instead of growing memory.
        let (ops, queue) = mpsc::channel(4 * MAX_BATCH);
        let batcher = Batcher {
            client,
            prefix: prefix.to_owned(),
            timeout,
            connection: None,
            background_failures,
            warned_at: None,
        };
        let task = tokio::spawn(batcher.run(queue));
        Ok(Self {
            ops,
            drained: Some(ReplayDrained(task)),
            timeout,
            background: Arc::new(Semaphore::new(MAX_BATCH)),
        })
    }

    /// Queues one operation and waits for its answer, at most the Redis timeout in all
    /// (queueing included): the caller fails open, so a slow Redis must not hold webhooks.
    async fn ask<T>(
        &self,
        op: Op,
        answer: oneshot::Receiver<Result<T, ReplayError>>,
    ) -> Result<T, ReplayError> {
        self.queue(op)?;
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Err(ReplayError::Timeout(self.timeout)),
            Ok(Err(_)) => Err(ReplayError::Redis("the replay memory stopped".into())),
            Ok(Ok(result)) => result,
        }
    }

    /// The end of the batching task, to wait for at shutdown: it comes once every handle on
    /// this store is dropped and the operations queued by then were sent. Taken once.
    pub fn take_drained(&mut self) -> Option<ReplayDrained> {
        self.drained.take()
    }

    fn queue(&self, op: Op) -> Result<(), ReplayError> {
        self.ops.try_send(op).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => {
                ReplayError::Redis("too many replay checks waiting".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                ReplayError::Redis("the replay memory stopped".into())
            }
        })
    }
}

impl ReplayStore for RedisReplay {
    fn seen<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, ReplayError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let op = Op::Seen {
                key: key.to_owned(),
                reply,
            };
            self.ask(op, answer).await
        })
    }

    fn remember<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let op = Op::Remember {
                key: key.to_owned(),
                seconds: ttl.as_secs().max(1),
                reply: Some(reply),
                _place: None,
            };
            self.ask(op, answer).await
        })
    }

    fn remember_in_background(&self, key: &str, ttl: Duration) -> Result<(), ReplayError> {
        let place = self.background.clone().try_acquire_owned().map_err(|_| {
            ReplayError::Redis("too many token ids waiting to be remembered".into())
        })?;
        self.queue(Op::Remember {
            key: key.to_owned(),
            seconds: ttl.as_secs().max(1),
            reply: None,
            _place: Some(place),
        })
    }
}

/// The batching task of a [`RedisReplay`].
pub struct ReplayDrained(tokio::task::JoinHandle<()>);

impl ReplayDrained {
    /// Waits at most `limit` for the queued operations to be sent; whether they were.
    pub async fn wait(self, limit: Duration) -> bool {
        matches!(tokio::time::timeout(limit, self.0).await, Ok(Ok(())))
    }
}

/// Owns the connection and sends the queued operations, one pipeline at a time.
struct Batcher {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    connection: Option<ConnectionManager>,
    background_failures: Counter,
    /// When failed background writes were last logged (at most once a second).
    warned_at: Option<Instant>,
}

impl Batcher {
    async fn run(mut self, mut queue: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // While one pipeline is out, the next requests queue up and leave together.
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.send(&mut batch).await;
        }
    }

    async fn connection(&mut self) -> Result<ConnectionManager, ReplayError> {
        if let Some(conn) = &self.connection {
            return Ok(conn.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| ReplayError::Timeout(self.timeout))?
        .map_err(|e| ReplayError::Redis(e.to_string()))?;
        self.connection = Some(conn.clone());
        Ok(conn)
    }

    async fn send(&mut self, batch: &mut Vec<Op>) {
        let mut pipe = redis::pipe();
        // Each command keeps its own answer: a refused write (out of memory, a read-only
        // replica after a failover) must not fail the checks sent with it.
        pipe.ignore_errors();
        for op in batch.iter() {
            match op {
                Op::Seen { key, .. } => {
                    pipe.exists(format!("{}replay:{key}", self.prefix));
                }
                Op::Remember { key, seconds, .. } => {
                    pipe.set_ex(format!("{}replay:{key}", self.prefix), 1u8, *seconds);
                }
            }
        }
        let result = match self.connection().await {
            Ok(mut conn) => {
                match tokio::time::timeout(
                    self.timeout,
                    pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut conn),
                )
                .await
                {
                    Err(_) => Err(ReplayError::Timeout(self.timeout)),
                    Ok(Err(e)) => Err(ReplayError::Redis(e.to_string())),
                    Ok(Ok(values)) if values.len() == batch.len() => Ok(values),
                    Ok(Ok(values)) => Err(ReplayError::Redis(format!(
                        "{} answers to {} commands",
                        values.len(),
                        batch.len()
                    ))),
                }
            }
            Err(error) => Err(error),
        };
        let mut unheard = None;
        match result {
            Ok(values) => {
                for (op, value) in batch.drain(..).zip(values) {
                    if let Err(error) = op.answer(Ok(&value)) {
                        self.background_failures.inc();
                        unheard = Some(error);
                    }
                }
            }
            Err(error) => {
                for op in batch.drain(..) {
                    if op.answer(Err(&error)).is_err() {
                        self.background_failures.inc();
                        unheard = Some(error.clone());
                    }
                }
            }
        }
        // At most one line a second, not one per key: a Redis outage must not flood the log.
        if let Some(error) = unheard
            && self
                .warned_at
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.warned_at = Some(Instant::now());
            tracing::warn!(%error, "cannot remember token ids; a replay of them would be published again (one line a second; ingress_replay_store_errors_total counts them)");
        }
    }
}

impl Op {
    /// Sends this operation its answer: Redis's reply to its command, or the error that failed
    /// the whole pipeline. A caller that gave up (timeout, dropped request) no longer listens.
    /// Returns the error of a background write, which has nobody to send it to.
    fn answer(
        self,
        reply_or_error: Result<&redis::RedisResult<Value>, &ReplayError>,
    ) -> Result<(), ReplayError> {
        match self {
            Op::Seen { reply, .. } => {
                let _ = reply.send(reply_or_error.map_err(Clone::clone).and_then(exists_answer));
            }
            Op::Remember {
                reply: Some(reply), ..
            } => {
                let _ = reply.send(reply_or_error.map_err(Clone::clone).and_then(set_answer));
            }
            Op::Remember { reply: None, .. } => {
                reply_or_error.map_err(Clone::clone).and_then(set_answer)?;
            }
        }
        Ok(())
    }
}

fn exists_answer(value: &redis::RedisResult<Value>) -> Result<bool, ReplayError> {
    match value {
        Ok(Value::Int(n)) => Ok(*n > 0),
        Ok(other) => Err(ReplayError::Redis(format!("EXISTS answered {other:?}"))),
        Err(error) => Err(ReplayError::Redis(error.to_string())),
    }
}

fn set_answer(value: &redis::RedisResult<Value>) -> Result<(), ReplayError> {
    match value {
        Ok(Value::Okay) => Ok(()),
        Ok(other) => Err(ReplayError::Redis(format!("SET answered {other:?}"))),
        Err(error) => Err(ReplayError::Redis(error.to_string())),
    }
}

/// In-process store for unit tests and single-process tools.
#[derive(Default)]
pub struct MemoryReplay {
    keys: Mutex<HashMap<String, Instant>>,
}

impl ReplayStore for MemoryReplay {
    fn seen<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, ReplayError>> {
        Box::pin(async move {
            let keys = self
                .keys
                .lock()
                .map_err(|_| ReplayError::Redis("poisoned".into()))?;
            Ok(keys.get(key).is_some_and(|until| *until > Instant::now()))
        })
    }

    fn remember<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        // In process, the write is done at once either way.
        Box::pin(async move { self.remember_in_background(key, ttl) })
    }

    fn remember_in_background(&self, key: &str, ttl: Duration) -> Result<(), ReplayError> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| ReplayError::Redis("poisoned".into()))?;
        keys.insert(key.to_owned(), Instant::now() + ttl);
        Ok(())
    }
}
