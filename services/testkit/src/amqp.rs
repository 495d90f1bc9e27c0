use std::sync::Mutex;

use lapin::{
    Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
};

/// A name prefix of its own for one test. Exchanges and queues the test declares are deleted
/// on drop: the test registers them with [`TestAmqp::track_queue`] and
/// [`TestAmqp::track_exchange`] (the management API is not available to list them).
pub struct TestAmqp {
    prefix: String,
    url: String,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl TestAmqp {
    /// Checks RabbitMQ answers (panics loudly otherwise) and picks a unique prefix.
    pub async fn create() -> Self {
        let url = crate::amqp_url();
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ at {url} is required for this test but unreachable: {e}")
            });
        let _ = conn.close(200, "ok".into()).await;
        Self {
            prefix: format!("{}.", crate::unique("q")),
            url,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn track_queue(&self, name: impl Into<String>) {
        if let Ok(mut q) = self.queues.lock() {
            q.push(name.into());
        }
    }

    pub fn track_exchange(&self, name: impl Into<String>) {
        if let Ok(mut e) = self.exchanges.lock() {
            e.push(name.into());
        }
    }
}

impl Drop for TestAmqp {
    fn drop(&mut self) {
        let url = self.url.clone();
        let queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        let exchanges = self.exchanges.lock().map(|e| e.clone()).unwrap_or_default();
        crate::block_on_thread(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await
            else {
                eprintln!("testkit: cannot clean AMQP names");
                return;
            };
            for queue in queues {
                // Each delete on its own channel: a failure closes the channel.
                if let Ok(channel) = conn.create_channel().await {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
            for exchange in exchanges {
                if let Ok(channel) = conn.create_channel().await {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = conn.close(200, "ok".into()).await;
        });
    }
}
