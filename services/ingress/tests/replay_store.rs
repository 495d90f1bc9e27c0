//! The Redis replay memory against the real Redis: many requests at once are sent as shared
//! pipelines, and each still gets the answer for its own key; an unreachable Redis answers
//! with an error (ingress then publishes without the check) instead of hanging; writes nobody
//! waits for are bounded while Redis stalls.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly

use std::time::Duration;

use futures::future::join_all;
use prometheus_client::metrics::counter::Counter;
use shopctrl_ingress::replay::{RedisReplay, ReplayError, ReplayStore};
use shopctrl_testkit::TestRedis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_and_remembers_each_get_their_own_answer() {
    let redis = TestRedis::create().await;
    let store = RedisReplay::start(
        redis.url(),
        redis.prefix(),
        Duration::from_secs(5),
        Counter::default(),
    )
    .unwrap();

    // Every third key remembered, each with its own lifetime, all at once.
    let remembered = join_all((0..900u64).filter(|i| i % 3 == 0).map(|i| {
        let store = &store;
        async move {
            store
                .remember(&format!("shop:jti:{i}"), Duration::from_secs(60 + i))
                .await
        }
    }))
    .await;
    assert!(remembered.iter().all(Result::is_ok), "{remembered:?}");

    // Checks of every key, interleaved with remembers of other keys, all queued together (more
    // than one pipeline's worth): each check gets its own key's answer.
    let mixed = join_all((0..900u64).map(|i| {
        let store = &store;
        async move {
            let check = store.seen(&format!("shop:jti:{i}")).await;
            let other = store
                .remember(&format!("other:jti:{i}"), Duration::from_secs(30))
                .await;
            (i, check, other)
        }
    }))
    .await;
    for (i, check, other) in mixed {
        assert_eq!(check.unwrap(), i % 3 == 0, "key {i}");
        other.unwrap();
    }
    let others = join_all((0..900u64).map(|i| {
        let store = &store;
        async move { store.seen(&format!("other:jti:{i}")).await }
    }))
    .await;
    assert!(others.into_iter().all(|seen| seen.unwrap()));

    // Each key carries its own lifetime.
    let mut conn = redis.connection().await;
    for i in [0u64, 450, 897] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("{}replay:shop:jti:{i}", redis.prefix()))
            .query_async(&mut conn)
            .await
            .unwrap();
        let asked = 60 + i as i64;
        assert!((asked - 10..=asked).contains(&ttl), "key {i}: ttl {ttl}");
    }

    // A check and a remember of the same key queued together are applied in order.
    let (first, _, second) = tokio::join!(
        store.seen("shop:jti:late"),
        store.remember("shop:jti:late", Duration::from_secs(30)),
        store.seen("shop:jti:late"),
    );
    assert!(!first.unwrap());
    assert!(second.unwrap());

    // A write nobody waits for is still applied before any check queued after it.
    for i in 0..300u64 {
        store
            .remember_in_background(&format!("background:jti:{i}"), Duration::from_secs(30))
            .unwrap();
    }
    let checks = join_all((0..300u64).map(|i| {
        let store = &store;
        async move { store.seen(&format!("background:jti:{i}")).await }
    }))
    .await;
    assert!(checks.into_iter().all(|seen| seen.unwrap()));
}

/// A private redis-server (this test reconfigures it), killed when dropped.
struct PrivateRedis {
    _process: tokio::process::Child,
    url: String,
}

impl PrivateRedis {
    async fn start(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is required for this test (it is installed with Redis)");
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str()).unwrap();
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Self {
                    _process: process,
                    url,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the private redis-server on port {port} did not start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_remember_does_not_fail_the_checks_sent_with_it() {
    // Out of memory for every write; reads still answer.
    let redis =
        PrivateRedis::start(&["--maxmemory", "1", "--maxmemory-policy", "noeviction"]).await;
    let failures = Counter::default();
    let store = RedisReplay::start(
        &redis.url,
        "private:",
        Duration::from_secs(5),
        failures.clone(),
    )
    .unwrap();
    let answers = join_all((0..200u64).map(|i| {
        let store = &store;
        async move {
            if i % 2 == 0 {
                (i, store.seen(&format!("k{i}")).await.map(|seen| !seen))
            } else {
                (
                    i,
                    store
                        .remember(&format!("k{i}"), Duration::from_secs(10))
                        .await
                        .map(|()| true),
                )
            }
        }
    }))
    .await;
    for (i, answer) in answers {
        if i % 2 == 0 {
            assert!(answer.unwrap(), "check {i}: never remembered");
        } else {
            let error = answer.expect_err("a write over maxmemory is refused");
            assert!(error.to_string().contains("OOM"), "{error}");
        }
    }
    assert_eq!(
        failures.get(),
        0,
        "every refused write was answered to its caller"
    );

    // Refused writes nobody waits for are counted instead.
    for i in 0..5 {
        store
            .remember_in_background(&format!("b{i}"), Duration::from_secs(10))
            .unwrap();
    }
    // A check queued after them comes back only after their pipeline was answered.
    assert!(!store.seen("b0").await.unwrap());
    assert_eq!(failures.get(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_answers_errors_quickly() {
    // Nothing listens on port 1.
    let store = RedisReplay::start(
        "redis://127.0.0.1:1/",
        "unreachable:",
        Duration::from_millis(300),
        Counter::default(),
    )
    .unwrap();
    // A hang guard, not a timing check: without an answer the request would wait forever.
    let (answers, remembered) = tokio::time::timeout(Duration::from_secs(30), async {
        let answers = join_all((0..20).map(|i| {
            let store = &store;
            async move { store.seen(&format!("k{i}")).await }
        }))
        .await;
        (answers, store.remember("k0", Duration::from_secs(10)).await)
    })
    .await
    .expect("the replay memory must answer, not hang");
    assert!(answers.iter().all(Result::is_err), "{answers:?}");
    assert!(remembered.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_writes_waiting_for_a_stalled_redis_are_bounded() {
    // Takes connections into its backlog and never answers: every pipeline waits (for the
    // 2 s timeout), holding its background writes' places.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/", stalled.local_addr().unwrap());
    let store =
        RedisReplay::start(&url, "stalled:", Duration::from_secs(2), Counter::default()).unwrap();
    let queued = (0..2_000)
        .map(|i| store.remember_in_background(&format!("k{i}"), Duration::from_secs(10)))
        .filter(Result::is_ok)
        .count();
    assert_eq!(queued, 512, "background writes queued while Redis stalls");
    // The checks keep their room in the queue: one is queued, and fails only by its timeout.
    let check = tokio::time::timeout(Duration::from_secs(30), store.seen("k0"))
        .await
        .expect("the check is answered (hang guard)");
    assert!(matches!(check, Err(ReplayError::Timeout(_))), "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_when_the_store_is_dropped_are_sent_before_it_reports_drained() {
    let redis = TestRedis::create().await;
    let mut store = RedisReplay::start(
        redis.url(),
        redis.prefix(),
        Duration::from_secs(5),
        Counter::default(),
    )
    .unwrap();
    let drained = store.take_drained().expect("the batching task");
    assert!(store.take_drained().is_none(), "taken once");
    for i in 0..300u64 {
        store
            .remember_in_background(&format!("shutdown:jti:{i}"), Duration::from_secs(30))
            .unwrap();
    }
    drop(store);
    assert!(
        drained.wait(Duration::from_secs(20)).await,
        "drained in time"
    );
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}replay:shutdown:jti:*", redis.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 300);
}
