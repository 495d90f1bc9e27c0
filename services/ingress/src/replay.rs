//! Replay memory: a verified token's `jti` (or a legacy signature) is remembered after its
//! publish was confirmed, for the token's remaining lifetime plus leeway. A request that
//! reuses it is answered 200 and not published again.
//!
//! The store fails open: when Redis is unreachable the request is published anyway (and the
//! failure counted), because a replayed event is harmless downstream (routing deduplicates by
//! event id) while refusing genuine webhooks during a Redis outage would lose availability.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use redis::{AsyncCommands, aio::ConnectionManager};

/// Why the replay store could not answer.
#[derive(Debug, thiserror::Error)]
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
}

/// Redis-backed store; keys are `<prefix>replay:<key>`.
pub struct RedisReplay {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
}

impl RedisReplay {
    /// Does not connect yet: ingress starts while Redis is down.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, ReplayError> {
        let client = redis::Client::open(url).map_err(|e| ReplayError::Redis(e.to_string()))?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
            timeout,
            connection: tokio::sync::Mutex::new(None),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, ReplayError> {
        let mut guard = self.connection.lock().await;
        if let Some(conn) = guard.as_ref() {
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
        *guard = Some(conn.clone());
        Ok(conn)
    }

    fn key(&self, key: &str) -> String {
        format!("{}replay:{key}", self.prefix)
    }
}

impl ReplayStore for RedisReplay {
    fn seen<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, ReplayError>> {
        Box::pin(async move {
            let mut conn = self.connection().await?;
            let full = self.key(key);
            tokio::time::timeout(self.timeout, conn.exists::<_, bool>(full))
                .await
                .map_err(|_| ReplayError::Timeout(self.timeout))?
                .map_err(|e| ReplayError::Redis(e.to_string()))
        })
    }

    fn remember<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), ReplayError>> {
        Box::pin(async move {
            let mut conn = self.connection().await?;
            let full = self.key(key);
            let seconds = ttl.as_secs().max(1);
            tokio::time::timeout(self.timeout, conn.set_ex::<_, _, ()>(full, 1u8, seconds))
                .await
                .map_err(|_| ReplayError::Timeout(self.timeout))?
                .map_err(|e| ReplayError::Redis(e.to_string()))
        })
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
        Box::pin(async move {
            let mut keys = self
                .keys
                .lock()
                .map_err(|_| ReplayError::Redis("poisoned".into()))?;
            keys.insert(key.to_owned(), Instant::now() + ttl);
            Ok(())
        })
    }
}
