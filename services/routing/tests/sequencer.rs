//! Employee events are numbered after commit by the sequencer: consecutive per employee, each
//! exactly once, in the order each producer committed them, with two sequencers racing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::{Env, eventually, shop};
use prost::Message as _;
use shopctrl_proto::v1::{EmployeeEvent, NotificationBatch, SendFailedEvent, employee_event};
use shopctrl_routing::{
    sequencer::Sequencer,
    store::{PendingEvents, Sink},
};

/// An event whose content says who produced it and in which order.
fn marker(producer: usize, n: usize) -> employee_event::Event {
    employee_event::Event::SendFailed(SendFailedEvent {
        description: format!("{producer}:{n}"),
        ..Default::default()
    })
}

#[tokio::test]
async fn events_are_numbered_consecutively_once_in_commit_order() {
    let env = Env::prepare(shop(true, false), 1).await;
    let sink = Sink {
        names: env.names.clone(),
    };
    const PRODUCERS: usize = 4;
    const BATCHES: usize = 25;
    let employees = ["e1", "e2", "e3"];

    // Producers commit batches concurrently, every batch with events for every employee,
    // while two sequencers number what is committed.
    let mut tasks = tokio::task::JoinSet::new();
    for producer in 0..PRODUCERS {
        let pool = env.pool.clone();
        let sink = sink.clone();
        tasks.spawn(async move {
            for batch in 0..BATCHES {
                let mut tx = pool.begin().await.unwrap();
                let mut pending = PendingEvents::default();
                for (i, employee) in employees.iter().enumerate() {
                    pending.push(employee, "shop-1", marker(producer, batch * 10 + i));
                }
                sink.store_pending(&mut tx, &mut pending).await.unwrap();
                tx.commit().await.unwrap();
            }
        });
    }
    let sequencers: Vec<Sequencer> = (0..2)
        .map(|_| Sequencer::new(env.pool.clone(), sink.clone()))
        .collect();
    let racing: Vec<_> = sequencers
        .iter()
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    s.number_once(true).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    for task in racing {
        task.await.unwrap();
    }
    while sequencers[0].number_once(true).await.unwrap() > 0 {}

    let total = PRODUCERS * BATCHES;
    assert_eq!(
        env.count("select count(*) from employee_events_unnumbered")
            .await,
        0
    );
    for employee in employees {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "select sequence, event from employee_events where employee_id = $1 order by sequence",
        )
        .bind(employee)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        let sequences: Vec<i64> = rows.iter().map(|(s, _)| *s).collect();
        let expected: Vec<i64> = (1..=total as i64).collect();
        assert_eq!(
            sequences, expected,
            "{employee}: consecutive from 1, each once"
        );
        // Each producer's events keep their commit order.
        let mut last_seen: HashMap<String, usize> = HashMap::new();
        for (sequence, bytes) in &rows {
            let event = EmployeeEvent::decode(bytes.as_slice()).unwrap();
            assert_eq!(
                event.sequence, *sequence as u64,
                "the stored event carries its number"
            );
            let Some(employee_event::Event::SendFailed(marker)) = event.event else {
                panic!("unexpected event");
            };
            let (producer, n) = marker.description.split_once(':').unwrap();
            let n: usize = n.parse().unwrap();
            if let Some(previous) = last_seen.insert(producer.to_owned(), n) {
                assert!(previous < n, "{employee}: producer {producer} out of order");
            }
        }
        let latest: i64 = sqlx::query_scalar(
            "select last_sequence from employee_sequences where employee_id = $1",
        )
        .bind(employee)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(latest, total as i64);
    }
    // Every event announced once, carrying its number, in batches whose order follows the
    // numbering.
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "select payload from outbox where routing_key = 'employees' order by outbox_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(
        payloads.len() < total * employees.len(),
        "{} messages for {} events: announcements are batched",
        payloads.len(),
        total * employees.len()
    );
    let mut announced: HashMap<(String, u64), usize> = HashMap::new();
    // Across messages too: the outbox is relayed in its order.
    let mut last: HashMap<String, u64> = HashMap::new();
    for payload in payloads {
        let batch = NotificationBatch::decode(payload.as_slice()).unwrap();
        assert!(!batch.notifications.is_empty() && batch.notifications.len() <= 250);
        for n in batch.notifications {
            let event = EmployeeEvent::decode(n.employee_event.as_slice()).unwrap();
            assert_eq!(n.sequence, event.sequence);
            assert_eq!(n.employee_id, event.employee_id);
            if let Some(previous) = last.insert(n.employee_id.clone(), n.sequence) {
                assert!(
                    previous < n.sequence,
                    "{}: announced out of order",
                    n.employee_id
                );
            }
            *announced.entry((n.employee_id, n.sequence)).or_default() += 1;
        }
    }
    assert_eq!(announced.len(), total * employees.len());
    assert!(announced.values().all(|&count| count == 1));
}

/// One numbering run of 600 events is announced in three messages of 250, 250 and 100, each
/// employee's numbers rising from one message to the next.
#[tokio::test]
async fn a_numbering_run_is_announced_in_messages_of_at_most_250_events() {
    let env = Env::prepare(shop(true, false), 1).await;
    let sink = Sink {
        names: env.names.clone(),
    };
    let mut tx = env.pool.begin().await.unwrap();
    let mut pending = PendingEvents::default();
    for n in 0..300 {
        pending.push("e1", "shop-1", marker(1, n));
        pending.push("e2", "shop-1", marker(2, n));
    }
    sink.store_pending(&mut tx, &mut pending).await.unwrap();
    tx.commit().await.unwrap();
    let numbered = Sequencer::new(env.pool.clone(), sink)
        .number_once(true)
        .await
        .unwrap();
    assert_eq!(numbered, 600);

    let rows: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("select routing_key, message_type, payload from outbox order by outbox_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let sizes: Vec<usize> = rows
        .iter()
        .map(|(routing_key, message_type, payload)| {
            assert_eq!(routing_key, "employees");
            assert_eq!(message_type, "shopctrl.messaging.v1.NotificationBatch");
            NotificationBatch::decode(payload.as_slice())
                .unwrap()
                .notifications
                .len()
        })
        .collect();
    assert_eq!(sizes, [250, 250, 100]);
    let mut expected: HashMap<String, u64> = HashMap::new();
    for (_, _, payload) in &rows {
        for n in NotificationBatch::decode(payload.as_slice())
            .unwrap()
            .notifications
        {
            let next = expected.entry(n.employee_id.clone()).or_insert(1);
            assert_eq!(
                n.sequence, *next,
                "{}: consecutive across messages",
                n.employee_id
            );
            *next += 1;
        }
    }
    assert_eq!(expected["e1"], 301);
    assert_eq!(expected["e2"], 301);
}

/// Operators see events waiting for the sequencer: a row no sequencer can decode (only
/// corruption could make one) stays, and the gauge counts it.
#[tokio::test]
async fn events_waiting_for_numbers_show_in_the_metrics() {
    let mut env = Env::prepare(shop(true, false), 1).await;
    sqlx::query(
        "insert into employee_events_unnumbered (employee_id, shop_id, event)
         values ('e1', 'shop-1', '\\xff'::bytea)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let service = env.spawn(None, None).await;
    let url = format!("http://{}/metrics", service.ops);
    env.services.push(service);
    eventually(20, "the gauge to count the waiting event", || async {
        let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
        body.lines()
            .any(|line| line == "routing_employee_events_unnumbered 1")
            .then_some(())
    })
    .await;
    assert_eq!(
        env.count("select count(*) from employee_events").await,
        0,
        "nothing was numbered from it"
    );
    env.stop_all().await;
}
