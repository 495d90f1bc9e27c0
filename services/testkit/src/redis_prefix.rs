/// A key prefix of its own for one test; every key under it is deleted on drop. Never flushes.
pub struct TestRedis {
    prefix: String,
    url: String,
}

impl TestRedis {
    /// Checks Redis answers (panics loudly otherwise) and picks a unique prefix.
    pub async fn create() -> Self {
        let url = crate::redis_url();
        let client = redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("TEST_REDIS_URL {url:?} is invalid: {e}"));
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("Redis at {url} is required for this test but unreachable: {e}")
            });
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} does not answer PING: {e}"));
        Self {
            prefix: format!("{}:", crate::unique("r")),
            url,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap_or_else(|e| panic!("invalid Redis URL: {e}"))
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("Redis unreachable: {e}"))
    }

    /// Deletes every key under the prefix (simulates losing the data, for this test only).
    pub async fn delete_all(&self) {
        delete_prefix(&self.url, &self.prefix).await;
    }
}

async fn delete_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        eprintln!("testkit: cannot clean Redis prefix {prefix}");
        return;
    };
    let pattern = format!("{}*", escape_glob(prefix));
    let mut cursor: u64 = 0;
    loop {
        let result: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await;
        let Ok((next, keys)) = result else { return };
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn escape_glob(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = self.prefix.clone();
        crate::block_on_thread(async move { delete_prefix(&url, &prefix).await });
    }
}
