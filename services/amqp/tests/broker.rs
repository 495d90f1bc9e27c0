//! The publisher, consumer and outbox against the real RabbitMQ and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    ExchangeKind,
    options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions},
    types::FieldTable,
};
use shopctrl_amqp::{
    ConsumerConfig, Handled, Names, OutboxMessage, OutboxRelay, Outgoing, PublishError, Publisher,
    QueueSpec, connect, declare_exchange, declare_queue, outbox_enqueue, run_consumer,
    string_header,
};
use shopctrl_testkit::{TcpProxy, TestAmqp, TestDatabase};
use tokio_util::sync::CancellationToken;

const OUTBOX_DDL: &str = "create table outbox (
    outbox_id bigserial primary key,
    event_id uuid not null unique,
    exchange text not null,
    routing_key text not null,
    message_type text not null,
    payload bytea not null,
    headers jsonb not null default '[]',
    created_at timestamptz not null default now())";

struct Fixture {
    amqp: TestAmqp,
    names: Names,
    exchange: String,
    queue: String,
    dlq: String,
}

/// A direct exchange with one quorum queue (dead-lettering to a DLQ) under a fresh prefix.
async fn fixture() -> Fixture {
    shopctrl_testkit::init_logging();
    let amqp = TestAmqp::create().await;
    let names = Names::new(amqp.prefix());
    let exchange = names.custom("work");
    let queue = names.custom("work.q");
    let dlq = names.dead_letter_queue("work");
    let conn = connect(amqp.url(), "test-setup").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    declare_exchange(&channel, &exchange, ExchangeKind::Direct)
        .await
        .unwrap();
    declare_exchange(
        &channel,
        &names.dead_letter_exchange(),
        ExchangeKind::Direct,
    )
    .await
    .unwrap();
    declare_queue(
        &channel,
        // Not single-active: basic.get is refused on such quorum queues.
        &QueueSpec::quorum(&queue)
            .dead_letter_to(names.dead_letter_exchange(), "work")
            .bind(&exchange, "k"),
    )
    .await
    .unwrap();
    declare_queue(
        &channel,
        &QueueSpec::quorum(&dlq).bind(names.dead_letter_exchange(), "work"),
    )
    .await
    .unwrap();
    for q in [&queue, &dlq] {
        amqp.track_queue(q.clone());
    }
    for e in [&exchange, &names.dead_letter_exchange()] {
        amqp.track_exchange(e.clone());
    }
    let _ = conn.close(200, "ok".into()).await;
    Fixture {
        amqp,
        names,
        exchange,
        queue,
        dlq,
    }
}

async fn get_one(url: &str, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    let conn = connect(url, "test-get").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let got = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    got
}

async fn queue_len(url: &str, queue: &str) -> u32 {
    let conn = connect(url, "test-len").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    q.message_count()
}

fn outgoing<'a>(f: &'a Fixture, key: &'a str, id: &'a str, body: &'a [u8]) -> Outgoing<'a> {
    Outgoing {
        exchange: &f.exchange,
        routing_key: key,
        message_type: "test.Message",
        message_id: id,
        payload: body,
        headers: &[],
        mandatory: true,
    }
}

#[tokio::test]
async fn confirmed_publish_arrives_once_with_properties() {
    let f = fixture().await;
    let publisher = Publisher::connect(f.amqp.url(), "test-pub", Duration::from_secs(5))
        .await
        .unwrap();
    publisher
        .publish(Outgoing {
            headers: &[(
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            )],
            ..outgoing(&f, "k", "m-1", b"hello")
        })
        .await
        .unwrap();
    let got = get_one(f.amqp.url(), &f.queue).await.expect("one message");
    assert_eq!(got.delivery.data, b"hello");
    let props = &got.delivery.properties;
    assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
    assert_eq!(
        props.kind().as_ref().map(|s| s.as_str()),
        Some("test.Message")
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(
        string_header(props.headers().as_ref(), "traceparent").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert!(
        get_one(f.amqp.url(), &f.queue).await.is_none(),
        "exactly once"
    );
}

#[tokio::test]
async fn unroutable_and_missing_exchange_are_errors() {
    let f = fixture().await;
    let publisher = Publisher::connect(f.amqp.url(), "test-pub", Duration::from_secs(5))
        .await
        .unwrap();
    let err = publisher
        .publish(outgoing(&f, "no-such-key", "m-2", b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err:?}");

    let missing = f.names.custom("missing-exchange");
    let err = publisher
        .publish(Outgoing {
            exchange: &missing,
            ..outgoing(&f, "k", "m-3", b"x")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Broker(_) | PublishError::NotConnected(_)),
        "{err:?}"
    );
    // The publisher recovers on the next publish.
    publisher
        .publish(outgoing(&f, "k", "m-4", b"ok"))
        .await
        .unwrap();
    assert_eq!(queue_len(f.amqp.url(), &f.queue).await, 1);
}

#[tokio::test]
async fn broker_outage_fails_the_publish_and_recovers() {
    let f = fixture().await;
    let upstream = shopctrl_testkit::amqp_url();
    let host_port = upstream
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_owned();
    let proxy = TcpProxy::start(&host_port).await;
    let via_proxy = upstream.replace(&host_port, &proxy.addr().to_string());
    let publisher = Publisher::connect(&via_proxy, "test-proxy", Duration::from_secs(2))
        .await
        .unwrap();
    publisher
        .publish(outgoing(&f, "k", "a", b"1"))
        .await
        .unwrap();
    proxy.cut();
    let err = publisher.publish(outgoing(&f, "k", "b", b"2")).await;
    assert!(err.is_err(), "a publish during the outage must not succeed");
    assert!(!publisher.is_connected());
    proxy.restore();
    publisher
        .publish(outgoing(&f, "k", "c", b"3"))
        .await
        .unwrap();
    let mut bodies = Vec::new();
    while let Some(got) = get_one(f.amqp.url(), &f.queue).await {
        bodies.push(got.delivery.data);
    }
    assert_eq!(bodies, vec![b"1".to_vec(), b"3".to_vec()]);
}

fn consumer_config(f: &Fixture) -> ConsumerConfig {
    ConsumerConfig {
        url: f.amqp.url().to_owned(),
        connection_name: "test-consumer".into(),
        queue: f.queue.clone(),
        consumer_tag: "test".into(),
        prefetch: 10,
        concurrency: 1,
        max_attempts: 3,
        dead_letter: (f.names.dead_letter_exchange(), "work".into()),
        max_backoff: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn consumer_acks_retries_transient_and_dead_letters_with_reason() {
    let f = fixture().await;
    let publisher = Publisher::connect(f.amqp.url(), "test-pub", Duration::from_secs(5))
        .await
        .unwrap();
    for (id, body) in [
        ("ok", "ok"),
        ("flaky", "flaky"),
        ("bad", "bad"),
        ("poison", "poison"),
    ] {
        publisher
            .publish(outgoing(&f, "k", id, body.as_bytes()))
            .await
            .unwrap();
    }
    let flaky_tries = Arc::new(AtomicU32::new(0));
    let bad_tries = Arc::new(AtomicU32::new(0));
    let acked = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let task = {
        let (flaky_tries, bad_tries, acked, stop) = (
            flaky_tries.clone(),
            bad_tries.clone(),
            acked.clone(),
            stop.clone(),
        );
        let exchange = f.exchange.clone();
        tokio::spawn(run_consumer(
            consumer_config(&f),
            move |channel| {
                let exchange = exchange.clone();
                Box::pin(
                    async move { declare_exchange(channel, &exchange, ExchangeKind::Direct).await },
                )
            },
            move |incoming| {
                let (flaky_tries, bad_tries, acked) =
                    (flaky_tries.clone(), bad_tries.clone(), acked.clone());
                async move {
                    let body = String::from_utf8_lossy(&incoming.data).into_owned();
                    match body.as_str() {
                        "flaky" if flaky_tries.fetch_add(1, Ordering::SeqCst) < 2 => {
                            Handled::Transient("database unreachable".into())
                        }
                        "bad" => {
                            bad_tries.fetch_add(1, Ordering::SeqCst);
                            Handled::Failed("violates a rule".into())
                        }
                        "poison" => Handled::Poison("cannot parse".into()),
                        _ => {
                            acked.lock().await.push(body);
                            Handled::Ack
                        }
                    }
                }
            },
            stop,
        ))
    };
    // Wait until both dead letters arrived (bounded).
    let mut dead = Vec::new();
    for _ in 0..100 {
        while let Some(got) = get_one(f.amqp.url(), &f.dlq).await {
            dead.push(got);
        }
        if dead.len() >= 2 && acked.lock().await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();

    assert_eq!(
        *acked.lock().await,
        vec!["ok".to_string(), "flaky".to_string()]
    );
    assert_eq!(
        flaky_tries.load(Ordering::SeqCst),
        3,
        "transient errors retry the same message"
    );
    assert_eq!(
        bad_tries.load(Ordering::SeqCst),
        3,
        "bounded tries before dead-lettering"
    );
    let reasons: Vec<(Vec<u8>, Option<String>)> = dead
        .iter()
        .map(|d| {
            (
                d.delivery.data.clone(),
                string_header(
                    d.delivery.properties.headers().as_ref(),
                    "x-dead-letter-reason",
                ),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (b"bad".to_vec(), Some("violates a rule".into())),
            (b"poison".to_vec(), Some("cannot parse".into()))
        ]
    );
    assert_eq!(queue_len(f.amqp.url(), &f.queue).await, 0);
}

#[tokio::test]
async fn concurrent_consumer_holds_several_messages_at_once_and_acks_each() {
    let f = fixture().await;
    let publisher = Publisher::connect(f.amqp.url(), "test-pub", Duration::from_secs(5))
        .await
        .unwrap();
    for n in 0..6 {
        let body = n.to_string();
        publisher
            .publish(outgoing(&f, "k", &format!("m{n}"), body.as_bytes()))
            .await
            .unwrap();
    }
    // Each handler waits until three are in hand together: with one at a time this never
    // happens and nothing is acked.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let acked = Arc::new(AtomicU32::new(0));
    let stop = CancellationToken::new();
    let mut config = consumer_config(&f);
    config.prefetch = 1;
    config.concurrency = 3;
    let task = {
        let (barrier, acked) = (barrier.clone(), acked.clone());
        let exchange = f.exchange.clone();
        tokio::spawn(run_consumer(
            config,
            move |channel| {
                let exchange = exchange.clone();
                Box::pin(
                    async move { declare_exchange(channel, &exchange, ExchangeKind::Direct).await },
                )
            },
            move |_incoming| {
                let (barrier, acked) = (barrier.clone(), acked.clone());
                async move {
                    barrier.wait().await;
                    acked.fetch_add(1, Ordering::SeqCst);
                    Handled::Ack
                }
            },
            stop.clone(),
        ))
    };
    for _ in 0..100 {
        if acked.load(Ordering::SeqCst) == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        acked.load(Ordering::SeqCst),
        6,
        "all handled, three at a time"
    );
    assert_eq!(queue_len(f.amqp.url(), &f.queue).await, 0, "and each acked");
}

#[tokio::test]
async fn unacked_message_survives_consumer_shutdown() {
    let f = fixture().await;
    let publisher = Publisher::connect(f.amqp.url(), "test-pub", Duration::from_secs(5))
        .await
        .unwrap();
    publisher
        .publish(outgoing(&f, "k", "x", b"x"))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let seen = Arc::new(AtomicU32::new(0));
    let task = {
        let (stop2, seen) = (stop.clone(), seen.clone());
        tokio::spawn(run_consumer(
            consumer_config(&f),
            |_| Box::pin(async { Ok(()) }),
            move |_| {
                let (stop, seen) = (stop2.clone(), seen.clone());
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    stop.cancel();
                    Handled::Transient("outage while shutting down".into())
                }
            },
            stop,
        ))
    };
    task.await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert_eq!(
        queue_len(f.amqp.url(), &f.queue).await,
        1,
        "message handed back, not lost"
    );
}

#[tokio::test]
async fn outbox_publishes_only_committed_events_and_deletes_them() {
    let f = fixture().await;
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    sqlx::query(OUTBOX_DDL).execute(&pool).await.unwrap();
    let publisher = Publisher::connect(f.amqp.url(), "test-outbox", Duration::from_secs(5))
        .await
        .unwrap();
    let relay = OutboxRelay::new(pool.clone(), publisher);
    let message = |body: &str| OutboxMessage {
        event_id: uuid::Uuid::new_v4(),
        exchange: f.exchange.clone(),
        routing_key: "k".into(),
        message_type: "test.Event".into(),
        payload: body.as_bytes().to_vec(),
        headers: vec![("x-shop".into(), "s1".into())],
    };

    let mut rolled_back = pool.begin().await.unwrap();
    outbox_enqueue(&mut rolled_back, &message("rolled back"))
        .await
        .unwrap();
    rolled_back.rollback().await.unwrap();

    let committed = message("committed");
    let mut tx = pool.begin().await.unwrap();
    outbox_enqueue(&mut tx, &committed).await.unwrap();
    assert_eq!(
        relay.relay_once().await.unwrap(),
        0,
        "invisible before commit"
    );
    tx.commit().await.unwrap();

    assert_eq!(relay.relay_once().await.unwrap(), 1);
    assert_eq!(
        relay.pending().await.unwrap(),
        0,
        "deleted after the confirm"
    );
    let got = get_one(f.amqp.url(), &f.queue).await.expect("relayed");
    assert_eq!(got.delivery.data, b"committed");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(committed.event_id.to_string())
    );
    assert_eq!(
        string_header(got.delivery.properties.headers().as_ref(), "x-shop").as_deref(),
        Some("s1")
    );
    assert!(get_one(f.amqp.url(), &f.queue).await.is_none());
}

#[tokio::test]
async fn outbox_keeps_events_while_the_broker_refuses_them() {
    let f = fixture().await;
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    sqlx::query(OUTBOX_DDL).execute(&pool).await.unwrap();
    let publisher = Publisher::connect(f.amqp.url(), "test-outbox", Duration::from_secs(5))
        .await
        .unwrap();
    let relay = OutboxRelay::new(pool.clone(), publisher);
    let mut tx = pool.begin().await.unwrap();
    outbox_enqueue(
        &mut tx,
        &OutboxMessage {
            event_id: uuid::Uuid::new_v4(),
            exchange: f.exchange.clone(),
            routing_key: "unbound".into(),
            message_type: "test.Event".into(),
            payload: b"x".to_vec(),
            headers: vec![],
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(relay.relay_once().await.is_err());
    assert_eq!(
        relay.pending().await.unwrap(),
        1,
        "an unconfirmed event stays in the outbox"
    );
}

#[tokio::test]
async fn outbox_relay_runs_and_wakes_on_commit() {
    let f = fixture().await;
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    sqlx::query(OUTBOX_DDL).execute(&pool).await.unwrap();
    let publisher = Publisher::connect(f.amqp.url(), "test-outbox", Duration::from_secs(5))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay::new(pool.clone(), publisher)
            .with_poll_interval(Duration::from_secs(30))
            .run(stop.clone()),
    );
    // Consume live so the assertion waits on the event, not on a clock.
    let conn = connect(f.amqp.url(), "test-live").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            f.queue.as_str().into(),
            "live".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tx = pool.begin().await.unwrap();
    for i in 0..300 {
        outbox_enqueue(
            &mut tx,
            &OutboxMessage {
                event_id: uuid::Uuid::new_v4(),
                exchange: f.exchange.clone(),
                routing_key: "k".into(),
                message_type: "test.Event".into(),
                payload: format!("{i}").into_bytes(),
                headers: vec![],
            },
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let mut received = Vec::new();
    // The relay polls every 30 s here, so only the commit notification can deliver in time.
    while received.len() < 300 {
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("relay woke on commit")
            .unwrap()
            .unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        received.push(String::from_utf8(delivery.data).unwrap());
    }
    let expected: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    assert_eq!(received, expected, "relayed in commit order");
    stop.cancel();
    relay.await.unwrap();
    let _ = conn.close(200, "ok".into()).await;
}
