//! The Redis replay memory against the real Redis: many requests at once are sent as shared
//! pipelines, and each still gets the answer for its own key; an unreachable Redis answers
//! with an error (ingress then publishes without the check) instead of hanging.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly

use std::time::Duration;

use futures::future::join_all;
use shopctrl_ingress::replay::{RedisReplay, ReplayStore};
use shopctrl_testkit::TestRedis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_and_remembers_each_get_their_own_answer() {
    let redis = TestRedis::create().await;
    let store = RedisReplay::start(redis.url(), redis.prefix(), Duration::from_secs(5)).unwrap();

    // 300 remembers at once, with different lifetimes, then 600 checks at once: the first
    // half remembered, the second half never seen. Enough to fill several pipelines.
    let remembered = join_all((0..300).map(|i| {
        let store = &store;
        async move {
            store
                .remember(&format!("shop:jti:{i}"), Duration::from_secs(60 + i))
                .await
        }
    }))
    .await;
    assert!(remembered.iter().all(Result::is_ok), "{remembered:?}");

    let checks = join_all((0..600).map(|i| {
        let store = &store;
        async move { (i, store.seen(&format!("shop:jti:{i}")).await) }
    }))
    .await;
    for (i, answer) in checks {
        assert_eq!(answer.unwrap(), i < 300, "key {i}");
    }

    // Each key carries its own lifetime.
    let mut conn = redis.connection().await;
    for i in [0u64, 150, 299] {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_answers_errors_quickly() {
    // Nothing listens on port 1.
    let store = RedisReplay::start(
        "redis://127.0.0.1:1/",
        "unreachable:",
        Duration::from_millis(300),
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
