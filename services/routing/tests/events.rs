//! Employee events and replies end to end: unsupported types notify the assignee or the
//! shop's chatters; SubscribeEvents replays what a reconnecting agent missed, then goes live;
//! Reply stores the message, queues an OutboundSend, and OutboundSendResult marks it sent or
//! failed (telling the agent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Env, Msg, SHOP, as_employee, eventually, shop, status_name};
use futures::StreamExt;
use prost::Message as _;
use shopctrl_amqp::{Outgoing, QueueSpec, declare_queue, lapin};
use shopctrl_proto::v1::{
    DialogFilter, EmployeeEvent, EventMeta, ListDialogsRequest, ListMessagesRequest, MessageStatus,
    Notification, NotificationBatch, OutboundSend, OutboundSendResult, ReplyRequest,
    SubscribeEventsRequest, employee_event::Event,
};
use tonic::Streaming;

async fn subscribe(env: &Env, employee: &str, after: u64) -> Streaming<EmployeeEvent> {
    let mut client = env.client().await;
    client
        .subscribe_events(as_employee(
            SubscribeEventsRequest {
                after_sequence: after,
            },
            employee,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<EmployeeEvent>) -> EmployeeEvent {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event in time")
        .expect("the stream is open")
        .expect("no error")
}

fn image(conversation: &str, id: &str) -> Msg {
    let mut m = Msg::received(conversation, id, "");
    m.kind = "image";
    m
}

/// A queue of the test's own on the test's broker prefix, bound to `exchange` with `key`:
/// what routing publishes there, read with basic.get.
struct TestQueue {
    connection: lapin::Connection,
    channel: lapin::Channel,
    name: String,
}

impl TestQueue {
    async fn bind(env: &Env, name: &str, exchange: String, key: &str) -> Self {
        let connection =
            lapin::Connection::connect(env.amqp.url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let name = env.names.custom(name);
        // Deleted with the test's broker objects when the test ends.
        env.amqp.track_queue(name.clone());
        declare_queue(
            &channel,
            &QueueSpec::quorum(name.clone()).bind(exchange, key),
        )
        .await
        .unwrap();
        Self {
            connection,
            channel,
            name,
        }
    }

    async fn close(self) {
        let _ = self.connection.close(200, "ok".into()).await;
    }

    /// The next message, if one is waiting.
    async fn get(&self) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(
                self.name.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn unsupported_types_notify_the_shop_or_the_assignee() {
    let env = Env::start(shop(true, false)).await;
    let mut alice = subscribe(&env, "alice", 0).await;
    env.publish(&image("u-conv", "img-1").event()).await;
    let event = next(&mut alice).await;
    assert_eq!(event.sequence, 1);
    let Some(Event::UnsupportedMessage(notice)) = event.event else {
        panic!("expected an unsupported-message event, got {event:?}");
    };
    assert_eq!(notice.r#type, "image");
    let message = notice.message.unwrap();
    assert!(!message.supported);
    assert_eq!(message.r#type, "image");
    // bob has no Chat permission: no shop notice for him.
    assert_eq!(
        env.count("select count(*) from employee_events where employee_id = 'bob'")
            .await,
        0
    );

    // Once assigned (part 2 does it; here set directly), only the assignee hears of it, and
    // supported messages become new-message events.
    sqlx::query(
        "update conversations set state = 'assigned', assignee_employee_id = 'dave', unassigned_reason = null",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut dave = subscribe(&env, "dave", 0).await;
    env.publish(&image("u-conv", "img-2").event()).await;
    env.publish(&Msg::received("u-conv", "txt-3", "and a question").event())
        .await;
    let first = next(&mut dave).await;
    assert!(
        matches!(first.event, Some(Event::UnsupportedMessage(ref n)) if n.r#type == "image"),
        "{first:?}"
    );
    let second = next(&mut dave).await;
    let Some(Event::NewMessage(new)) = second.event else {
        panic!("expected a new-message event, got {second:?}");
    };
    // The event carries the message and the conversation exactly as they were stored (the
    // ingest builds them from its own statement rather than reading them back).
    let message = new.message.clone().unwrap();
    assert_eq!(message.text, "and a question");
    let mut conn = env.pool.acquire().await.unwrap();
    let message_id = uuid::Uuid::parse_str(&message.message_id).unwrap();
    let stored = shopctrl_routing::store::load_message(&mut conn, message_id)
        .await
        .unwrap();
    assert_eq!(Some(message), stored);
    let conversation = new.conversation.clone().unwrap();
    let conversation_id = uuid::Uuid::parse_str(&conversation.conversation_id).unwrap();
    let stored = shopctrl_routing::store::load_conversation(&mut conn, conversation_id)
        .await
        .unwrap();
    assert_eq!(Some(conversation), stored);
    assert_eq!((first.sequence, second.sequence), (1, 2));
    assert_eq!(
        env.count("select count(*) from employee_events where employee_id = 'alice'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_reconnecting_agent_misses_nothing() {
    let env = Env::start(shop(true, false)).await;
    let mut stream = subscribe(&env, "alice", 0).await;
    for i in 1..=3 {
        env.publish(&image(&format!("r-conv-{i}"), &format!("r-{i}")).event())
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut stream).await.sequence);
    }
    assert_eq!(seen, [1, 2, 3]);
    drop(stream);

    // Offline while three more happen.
    for i in 4..=6 {
        env.publish(&image(&format!("r-conv-{i}"), &format!("r-{i}")).event())
            .await;
    }
    eventually(20, "six stored events", || async {
        (env.count("select count(*) from employee_events where employee_id = 'alice'")
            .await
            == 6)
            .then_some(())
    })
    .await;
    let mut resumed = subscribe(&env, "alice", 3).await;
    let mut replayed = Vec::new();
    for _ in 0..3 {
        replayed.push(next(&mut resumed).await.sequence);
    }
    assert_eq!(replayed, [4, 5, 6], "replayed in order");
    // Then live, through RabbitMQ.
    for i in 7..=8 {
        env.publish(&image(&format!("r-conv-{i}"), &format!("r-{i}")).event())
            .await;
    }
    assert_eq!(next(&mut resumed).await.sequence, 7);
    assert_eq!(next(&mut resumed).await.sequence, 8);

    // A second replica serves the same employee from the same record.
    let other = env.spawn(None, None).await;
    let mut client =
        shopctrl_proto::v1::conversation_service_client::ConversationServiceClient::connect(
            format!("http://{}", other.grpc),
        )
        .await
        .unwrap();
    let mut elsewhere = client
        .subscribe_events(as_employee(
            SubscribeEventsRequest { after_sequence: 6 },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut elsewhere).await.sequence, 7);
    assert_eq!(next(&mut elsewhere).await.sequence, 8);
    env.publish(&image("r-conv-9", "r-9").event()).await;
    assert_eq!(next(&mut elsewhere).await.sequence, 9);
    assert_eq!(next(&mut resumed).await.sequence, 9);
    other.stop().await;
}

/// Live events come from the broker's announcements, not only from the periodic re-read of
/// the table: an announced event the table does not hold still reaches the live stream.
#[tokio::test]
async fn live_streams_are_fed_by_batched_announcements() {
    let env = Env::start(shop(true, false)).await;
    let mut stream = subscribe(&env, "alice", 0).await;
    // A real event first: once it arrived, the stream is live.
    env.publish(&image("live-conv-1", "live-1").event()).await;
    let first = next(&mut stream).await;
    assert_eq!(first.sequence, 1);

    let announced = |sequence: u64, description: &str| {
        let event = EmployeeEvent {
            sequence,
            employee_id: "alice".into(),
            occurred_at: None,
            event: Some(Event::SendFailed(shopctrl_proto::v1::SendFailedEvent {
                description: description.into(),
                ..Default::default()
            })),
        };
        Notification {
            meta: None,
            shop_id: SHOP.into(),
            employee_id: "alice".into(),
            sequence,
            employee_event: event.encode_to_vec(),
        }
    };
    let batch = NotificationBatch {
        meta: None,
        notifications: vec![
            announced(2, "only announced, never stored"),
            announced(3, "the next one, same message"),
        ],
    };
    env.publisher
        .publish(Outgoing {
            exchange: &env.names.notify_exchange(),
            routing_key: "employees",
            message_type: "shopctrl.messaging.v1.NotificationBatch",
            message_id: "test-announcement",
            payload: &batch.encode_to_vec(),
            headers: &[],
            mandatory: true,
        })
        .await
        .unwrap();
    for (sequence, description) in [
        (2, "only announced, never stored"),
        (3, "the next one, same message"),
    ] {
        let event = next(&mut stream).await;
        assert_eq!(event.sequence, sequence);
        let Some(Event::SendFailed(failed)) = event.event else {
            panic!("unexpected event {event:?}");
        };
        assert_eq!(failed.description, description);
    }
}

/// The other half of the live path: a real event is numbered, relayed and published on the
/// notify exchange under `employees`, as a NotificationBatch carrying the stored event.
#[tokio::test]
async fn stored_events_are_announced_in_batches_on_the_notify_exchange() {
    let env = Env::start(shop(true, false)).await;
    let queue = TestQueue::bind(
        &env,
        "test.announcements",
        env.names.notify_exchange(),
        "employees",
    )
    .await;
    env.publish(&image("announced-conv", "announced-1").event())
        .await;
    let batch = eventually(20, "an announcement", || async {
        let message = queue.get().await?;
        assert_eq!(
            message
                .delivery
                .properties
                .kind()
                .as_ref()
                .map(|k| k.as_str()),
            Some("shopctrl.messaging.v1.NotificationBatch")
        );
        Some(NotificationBatch::decode(message.delivery.data.as_slice()).unwrap())
    })
    .await;
    let alice: Vec<&Notification> = batch
        .notifications
        .iter()
        .filter(|n| n.employee_id == "alice")
        .collect();
    assert_eq!(alice.len(), 1, "{batch:?}");
    let event = EmployeeEvent::decode(alice[0].employee_event.as_slice()).unwrap();
    assert_eq!((alice[0].sequence, event.sequence), (1, 1));
    let stored: Vec<u8> = sqlx::query_scalar(
        "select event from employee_events where employee_id = 'alice' and sequence = 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        alice[0].employee_event, stored,
        "the stored event, as stored"
    );
    assert!(matches!(event.event, Some(Event::UnsupportedMessage(_))));
}

#[tokio::test]
async fn replies_go_out_through_the_outbox_and_results_come_back() {
    let env = Env::start(shop(true, false)).await;
    // flow-callback's side of the outbound exchange, for this test.
    let send_queue = TestQueue::bind(
        &env,
        "test.outbound.send",
        env.names.outbound_exchange(),
        "send",
    )
    .await;

    let created = chrono::Utc::now() - chrono::Duration::hours(2);
    let mut m = Msg::received("reply-conv", "in-1", "can I change my address?");
    m.created_at = created;
    env.publish(&m.event()).await;
    let mut client = env.client().await;
    let conversation = eventually(20, "the conversation", || {
        let mut client = client.clone();
        async move {
            client
                .list_dialogs(as_employee(
                    ListDialogsRequest {
                        shop_id: SHOP.into(),
                        filter: DialogFilter::All as i32,
                        page: None,
                    },
                    "alice",
                ))
                .await
                .ok()?
                .into_inner()
                .conversations
                .pop()
        }
    })
    .await;
    let reply = |text: &str, client_id: &str| {
        as_employee(
            ReplyRequest {
                conversation_id: conversation.conversation_id.clone(),
                text: text.into(),
                client_message_id: client_id.into(),
            },
            "alice",
        )
    };
    let stored = client
        .reply(reply("Sure, send it here", "c-1"))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!(status_name(stored.status), MessageStatus::Pending);
    assert_eq!(stored.sent_by_employee_id, "alice");
    // A retried call with the same client id stores nothing new.
    let again = client
        .reply(reply("Sure, send it here", "c-1"))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!(again.message_id, stored.message_id);
    // bob may not reply.
    let denied = client
        .reply(as_employee(
            ReplyRequest {
                conversation_id: conversation.conversation_id.clone(),
                text: "hi".into(),
                client_message_id: String::new(),
            },
            "bob",
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let send = eventually(20, "the outbound send", || async {
        send_queue
            .get()
            .await
            .map(|m| OutboundSend::decode(m.delivery.data.as_slice()).unwrap())
    })
    .await;
    assert_eq!(send.message_id, stored.message_id);
    assert_eq!(send.text, "Sure, send it here");
    assert_eq!(send.msisdn, "31612345678");
    assert_eq!(send.employee_id, "alice");
    assert_eq!(send.channel_id, "channel-1");
    assert_eq!(
        send.customer_last_received_at.unwrap().seconds,
        created.timestamp(),
        "the 24-hour window clock travels with the send"
    );

    let result = |message_id: &str, accepted: bool| OutboundSendResult {
        meta: Some(EventMeta {
            event_id: uuid::Uuid::new_v4().to_string(),
            occurred_at: None,
            producer: "flow-callback".into(),
        }),
        shop_id: SHOP.into(),
        conversation_id: conversation.conversation_id.clone(),
        message_id: message_id.into(),
        accepted,
        messagebird_message_id: if accepted {
            "mb-out-1".into()
        } else {
            String::new()
        },
        sent_as: "text".into(),
        error_code: if accepted { 0 } else { 470 },
        error_description: if accepted {
            String::new()
        } else {
            "outside the window".into()
        },
    };
    let publish_result = |r: OutboundSendResult| {
        let env = &env;
        async move {
            let payload = r.encode_to_vec();
            env.publisher
                .publish(Outgoing {
                    exchange: &env.names.outbound_exchange(),
                    routing_key: "result",
                    message_type: "shopctrl.messaging.v1.OutboundSendResult",
                    message_id: &r.meta.clone().unwrap().event_id,
                    payload: &payload,
                    headers: &[],
                    mandatory: true,
                })
                .await
                .unwrap();
        }
    };
    publish_result(result(&stored.message_id, true)).await;
    let mut alice = subscribe(&env, "alice", 0).await;
    let failed = client
        .reply(reply("Second try", "c-2"))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    publish_result(result(&failed.message_id, false)).await;

    let event = next(&mut alice).await;
    let Some(Event::SendFailed(notice)) = event.event else {
        panic!("expected a send-failed event, got {event:?}");
    };
    assert_eq!(notice.code, 470);
    assert_eq!(notice.message.unwrap().message_id, failed.message_id);

    let messages = client
        .list_messages(as_employee(
            ListMessagesRequest {
                conversation_id: conversation.conversation_id.clone(),
                page: None,
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[1].messagebird_message_id, "mb-out-1");
    assert_eq!(status_name(messages[1].status), MessageStatus::Sent);
    assert_eq!(status_name(messages[2].status), MessageStatus::Failed);
    assert_eq!(messages[2].failure, "470: outside the window");
    send_queue.close().await;
}
