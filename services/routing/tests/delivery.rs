//! Delivery guarantees end to end: poison and rule-breaking events go to the dead-letter queue
//! with their reason while the consumer keeps going; a crash between commit and ack changes
//! nothing on redelivery; one conversation's order holds across two consumers; config changes
//! reach the local copy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Env, Msg, SHOP, as_employee, eventually, shop};
use prost::Message as _;
use shopctrl_amqp::Outgoing;
use shopctrl_proto::v1::{
    ChatPermissionChanged, ConfigChanged, DialogFilter, EmployeeRoleChanged, EventMeta,
    ListDialogsRequest, Role, config_changed::Change,
};
use shopctrl_routing::consumer::{CommitHook, Committed};

#[tokio::test]
async fn poison_and_rule_breaking_events_are_dead_lettered_and_the_consumer_keeps_going() {
    let env = Env::start(shop(true, false)).await;
    let key = shopctrl_domain::shard_routing_key(SHOP, "dl-conv", env.shards);
    env.publish_raw(
        &key,
        "shopctrl.messaging.v1.InboundWebhookEvent",
        b"\xff\xff not protobuf",
    )
    .await;
    env.publish_raw(&key, "something.else", b"").await;
    // Decodes, but a customer message without any customer identity breaks a rule.
    let mut anonymous = Msg::received("dl-conv", "anon-1", "who am I");
    anonymous.msisdn = String::new();
    anonymous.contact_id = String::new();
    env.publish(&anonymous.event()).await;
    env.publish(&Msg::received("dl-conv", "fine-1", "I am fine").event())
        .await;

    eventually(30, "the good message", || async {
        (env.count("select count(*) from messages where messagebird_message_id = 'fine-1'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    let dead = eventually(10, "three dead letters", || async {
        let dead = env.dead_letters().await;
        (dead.len() == 3).then_some(dead)
    })
    .await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons[0].contains("undecodable InboundWebhookEvent"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("unexpected message type"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("without MSISDN or contact id"),
        "{reasons:?}"
    );
    assert_eq!(dead[0].0, b"\xff\xff not protobuf");
    assert_eq!(env.count("select count(*) from messages").await, 1);
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_changes_nothing_on_redelivery() {
    let mut env = Env::prepare(shop(true, false), 1).await;
    let proxy = Arc::new(shopctrl_testkit::TcpProxy::start("127.0.0.1:5672").await);
    let amqp_url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let cuts = Arc::new(AtomicUsize::new(0));
    let committed = Arc::new(AtomicUsize::new(0));
    let hook: CommitHook = {
        let proxy = proxy.clone();
        let cuts = cuts.clone();
        let committed = committed.clone();
        Arc::new(move |batch: &Committed| {
            committed.fetch_add(batch.received_at.len(), Ordering::SeqCst);
            // The first two commits lose the broker before their ack.
            if cuts.fetch_add(1, Ordering::SeqCst) < 2 {
                proxy.cut();
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    proxy.restore();
                });
            }
        })
    };
    let service = env.spawn(Some(&amqp_url), Some(hook)).await;
    env.services.push(service);
    for i in 0..20 {
        let mut m = Msg::received("crash-conv", &format!("crash-{i}"), &format!("m{i}"));
        m.created_at = chrono::Utc::now() + chrono::Duration::milliseconds(i);
        env.publish(&m.event()).await;
    }
    eventually(60, "all 20 messages", || async {
        (env.count("select count(*) from messages").await == 20).then_some(())
    })
    .await;
    // When all 20 arrive in the first batch, they are all stored before the cut batch comes
    // back: wait for its second commit rather than expect it already happened.
    eventually(
        60,
        "a batch that lost its ack to be committed again",
        || async { (committed.load(Ordering::SeqCst) > 20).then_some(()) },
    )
    .await;
    // Redeliveries were recognised: still one conversation, one customer, 20 messages, and
    // the queue drains to empty (everything acked in the end).
    eventually(30, "the shard queue to drain", || async {
        (queue_depth(&env, &env.names.inbound_shard_queue(0)).await == 0).then_some(())
    })
    .await;
    assert_eq!(env.count("select count(*) from messages").await, 20);
    assert_eq!(env.count("select count(*) from conversations").await, 1);
    assert_eq!(env.count("select count(*) from customers").await, 1);
    env.stop_all().await;
}

async fn queue_depth(env: &Env, queue: &str) -> u32 {
    let conn = shopctrl_amqp::lapin::Connection::connect(
        env.amqp.url(),
        shopctrl_amqp::lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            shopctrl_amqp::lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    declared.message_count()
}

#[tokio::test]
async fn one_conversation_keeps_its_order_across_two_consumers() {
    let env = Env::prepare(shop(true, false), 1).await;
    let first = env.spawn(None, None).await;
    let second = env.spawn(None, None).await;
    let base = chrono::Utc::now();
    for i in 0..150 {
        let mut m = Msg::received("order-conv", &format!("o-{i:04}"), &format!("n{i}"));
        m.created_at = base + chrono::Duration::milliseconds(i);
        env.publish(&m.event()).await;
    }
    eventually(60, "some messages", || async {
        (env.count("select count(*) from messages").await >= 30).then_some(())
    })
    .await;
    // Whichever consumer is active goes away mid-stream; the standby takes over in order.
    first.stop().await;
    for i in 150..300 {
        let mut m = Msg::received("order-conv", &format!("o-{i:04}"), &format!("n{i}"));
        m.created_at = base + chrono::Duration::milliseconds(i);
        env.publish(&m.event()).await;
    }
    eventually(90, "all 300 messages", || async {
        (env.count("select count(*) from messages").await == 300).then_some(())
    })
    .await;
    let stored: Vec<String> =
        sqlx::query_scalar("select messagebird_message_id from messages order by seq")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let expected: Vec<String> = (0..300).map(|i| format!("o-{i:04}")).collect();
    assert_eq!(stored, expected, "applied in publish order");
    second.stop().await;
}

async fn publish_config_event(env: &Env, change: Change) {
    let event = ConfigChanged {
        meta: Some(EventMeta {
            event_id: uuid::Uuid::new_v4().to_string(),
            occurred_at: None,
            producer: "config".into(),
        }),
        shop_id: SHOP.into(),
        version: 1,
        change: Some(change),
    };
    let payload = event.encode_to_vec();
    let id = uuid::Uuid::new_v4().to_string();
    env.publisher
        .publish(Outgoing {
            exchange: &env.names.config_exchange(),
            routing_key: "",
            message_type: "shopctrl.messaging.v1.ConfigChanged",
            message_id: &id,
            payload: &payload,
            headers: &[],
            mandatory: true,
        })
        .await
        .unwrap();
}

async fn stored_chat(env: &Env, employee: &str) -> Option<bool> {
    sqlx::query_scalar(
        "select chat_permission from shop_members where shop_id = $1 and employee_id = $2",
    )
    .bind(SHOP)
    .bind(employee)
    .fetch_optional(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn member_events_make_the_local_copy_follow_the_config_service() {
    let env = Env::start(shop(true, false)).await;
    let mut client = env.client().await;
    let list = || {
        as_employee(
            ListDialogsRequest {
                shop_id: SHOP.into(),
                filter: DialogFilter::All as i32,
                page: None,
            },
            "bob",
        )
    };
    assert_eq!(
        client.list_dialogs(list()).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(stored_chat(&env, "bob").await, Some(false));

    // Bob is granted Chat at the config service; its event makes routing re-read him. Only the
    // stored copy is polled: an API call would ask the config service itself.
    let mut granted = shop(true, false);
    granted.employees[1].chat_permission = true;
    env.config.put(granted.clone());
    publish_config_event(
        &env,
        Change::Permission(ChatPermissionChanged {
            employee_id: "bob".into(),
            chat_permission: true,
        }),
    )
    .await;
    eventually(90, "the grant in the local copy", || async {
        (stored_chat(&env, "bob").await == Some(true)).then_some(())
    })
    .await;
    client
        .list_dialogs(list())
        .await
        .expect("bob may list dialogs once the grant is applied");

    // An event whose content is older than the truth (the role event sent before the grant,
    // arriving late) does not take the grant back: the config service still says yes.
    publish_config_event(
        &env,
        Change::Role(EmployeeRoleChanged {
            employee_id: "bob".into(),
            role: Role::ShopEmployee as i32,
            chat_permission: false,
            display_name: "Bob".into(),
        }),
    )
    .await;
    // A later marker event shows the stale one was processed (one consumer, in order).
    granted.employees[0].chat_permission = false;
    env.config.put(granted);
    publish_config_event(
        &env,
        Change::Permission(ChatPermissionChanged {
            employee_id: "alice".into(),
            chat_permission: false,
        }),
    )
    .await;
    eventually(90, "alice's withdrawal in the local copy", || async {
        (stored_chat(&env, "alice").await == Some(false)).then_some(())
    })
    .await;
    assert_eq!(
        stored_chat(&env, "bob").await,
        Some(true),
        "the grant stands"
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_and_acks_the_work_in_hand() {
    let mut env = Env::prepare(shop(true, false), 1).await;
    let service = env.spawn(None, None).await;
    for i in 0..100 {
        env.publish(&Msg::received("stop-conv", &format!("s-{i}"), "x").event())
            .await;
    }
    eventually(30, "some progress", || async {
        (env.count("select count(*) from messages").await > 0).then_some(())
    })
    .await;
    service.stop().await;
    let stored = env.count("select count(*) from messages").await;
    let left = queue_depth(&env, &env.names.inbound_shard_queue(0)).await;
    // Nothing is lost or double-counted: what was committed was acked, the rest is queued.
    assert_eq!(
        stored + i64::from(left),
        100,
        "stored {stored}, queued {left}"
    );
    let again = env.spawn(None, None).await;
    eventually(60, "the rest after restart", || async {
        (env.count("select count(*) from messages").await == 100).then_some(())
    })
    .await;
    again.stop().await;
    env.services.clear();
}

#[tokio::test]
async fn a_database_outage_pauses_the_shard_and_dead_letters_nothing() {
    let mut env = Env::prepare(shop(true, false), 1).await;
    let proxy = shopctrl_testkit::TcpProxy::start("127.0.0.1:5432").await;
    let url = env
        .db
        .url()
        .replace("127.0.0.1:5432", &proxy.addr().to_string());
    assert_ne!(
        url,
        env.db.url(),
        "the test database must be on 127.0.0.1:5432"
    );
    let service = env.spawn_with_database(None, Some(&url), None).await;
    env.services.push(service);
    env.publish(&Msg::received("outage-conv", "before", "before").event())
        .await;
    eventually(30, "the first message", || async {
        (env.count("select count(*) from messages").await == 1).then_some(())
    })
    .await;

    proxy.cut();
    for i in 0..5 {
        env.publish(&Msg::received("outage-conv", &format!("during-{i}"), "during").event())
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.count("select count(*) from messages").await, 1);
    proxy.restore();
    eventually(60, "the messages held during the outage", || async {
        (env.count("select count(*) from messages").await == 6).then_some(())
    })
    .await;
    assert!(
        env.dead_letters().await.is_empty(),
        "an outage dead-letters nothing"
    );
    let stored: Vec<String> =
        sqlx::query_scalar("select messagebird_message_id from messages order by seq")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [
            "before", "during-0", "during-1", "during-2", "during-3", "during-4"
        ],
        "order kept through the outage"
    );
    env.stop_all().await;
}
