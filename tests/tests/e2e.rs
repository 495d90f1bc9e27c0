//! Every rule of the design, end to end through the public doors only: signed webhooks and
//! handovers into ingress, gRPC calls to config and routing, and what the simulated MessageBird
//! (Conversations API and flow receiver) receives. The real binaries run as separate processes
//! against the real PostgreSQL, Redis and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use shopctrl_e2e::{
    flow_receiver::{Handover, call_handover},
    webhooks::{Channel, Content, Conversation},
};
use shopctrl_proto::v1::{self as pb, DialogFilter};
use support::{OWNER, Stack, authed, eventually};

fn assigned_to(employee: &str) -> impl Fn(&pb::Conversation) -> bool + '_ {
    move |c| {
        c.state == pb::ConversationState::Assigned as i32
            && c.assignee
                .as_ref()
                .is_some_and(|a| a.employee_id == employee)
    }
}

fn waiting_because(reason: pb::UnassignedReason) -> impl Fn(&pb::Conversation) -> bool {
    move |c| {
        c.state == pb::ConversationState::WaitingForEmployee as i32
            && c.unassigned_reason == reason as i32
    }
}

async fn close(stack: &Stack, conversation_id: &str, employee: &str) {
    stack
        .routing_client()
        .await
        .close_conversation(authed(
            pb::CloseConversationRequest {
                conversation_id: conversation_id.into(),
            },
            employee,
        ))
        .await
        .expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_shared_across_shops_and_the_queue_drains_on_close() {
    let stack = Stack::start().await;
    let a = stack.create_shop("shop-a", 2, true).await;
    let b = stack.create_shop("shop-b", 1, true).await;
    stack.add_agent("shop-a", "ann").await;
    stack.add_agent("shop-b", "ann").await;

    let b1 = Conversation::new(Channel::WhatsApp, "31600000001");
    stack.customer_says(&b, &b1, "hello b").await;
    stack
        .wait_conversation("shop-b", "ann", &b1.conversation_id, assigned_to("ann"))
        .await;

    // 1 open (from B) < slots(A) = 2: A can still give ann one more.
    let a1 = Conversation::new(Channel::WhatsApp, "31600000002");
    stack.customer_says(&a, &a1, "hello a").await;
    let a1_record = stack
        .wait_conversation("shop-a", "ann", &a1.conversation_id, assigned_to("ann"))
        .await;

    // 2 open: A (limit 2) and B (limit 1) can give nothing more.
    let a2 = Conversation::new(Channel::WebWidget, "");
    stack.customer_says(&a, &a2, "from the widget").await;
    stack
        .wait_conversation(
            "shop-a",
            "ann",
            &a2.conversation_id,
            waiting_because(pb::UnassignedReason::AllFull),
        )
        .await;
    let b2 = Conversation::new(Channel::WhatsApp, "31600000003");
    stack.customer_says(&b, &b2, "me too").await;
    stack
        .wait_conversation(
            "shop-b",
            "ann",
            &b2.conversation_id,
            waiting_because(pb::UnassignedReason::AllFull),
        )
        .await;

    // Closing one frees a slot: the oldest waiting conversation ann may take (A's) is hers at once;
    // B's stays queued because 1 open is not below B's limit of 1.
    close(&stack, &a1_record.conversation_id, "ann").await;
    stack
        .wait_conversation("shop-a", "ann", &a2.conversation_id, assigned_to("ann"))
        .await;
    let mine_b = stack
        .dialogs("shop-b", "ann", DialogFilter::Mine)
        .await
        .unwrap();
    assert_eq!(mine_b.len(), 1, "B gave ann nothing more: {mine_b:#?}");
    let unassigned_b = stack
        .dialogs("shop-b", "ann", DialogFilter::Unassigned)
        .await
        .unwrap();
    assert_eq!(unassigned_b.len(), 1);
    assert_eq!(
        unassigned_b[0].messagebird_conversation_id,
        b2.conversation_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_slots_and_missing_permission_leave_conversations_unassigned_with_the_reason() {
    let stack = Stack::start().await;
    let zero = stack.create_shop("zero", 0, true).await;
    stack.add_agent("zero", "zed").await;
    let nobody = stack.create_shop("nobody", 3, true).await;

    let c1 = Conversation::new(Channel::WhatsApp, "31600000011");
    stack.customer_says(&zero, &c1, "anyone?").await;
    stack
        .wait_conversation(
            "zero",
            "zed",
            &c1.conversation_id,
            waiting_because(pb::UnassignedReason::SlotsZero),
        )
        .await;
    let unassigned = stack
        .dialogs("zero", "zed", DialogFilter::Unassigned)
        .await
        .unwrap();
    assert_eq!(unassigned.len(), 1, "listed under Unassigned");

    let c2 = Conversation::new(Channel::WhatsApp, "31600000012");
    stack.customer_says(&nobody, &c2, "hello?").await;
    // Nobody has the Chat permission there, so nobody can list; the owner grants it to watch.
    stack.add_agent("nobody", "late").await;
    let record = stack
        .wait_conversation("nobody", "late", &c2.conversation_id, |_| true)
        .await;
    // Granting the permission is capacity appearing: the waiting conversation is claimed.
    let record = if record.state == pb::ConversationState::Assigned as i32 {
        record
    } else {
        stack
            .wait_conversation("nobody", "late", &c2.conversation_id, assigned_to("late"))
            .await
    };
    assert_eq!(record.assignee.unwrap().employee_id, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_handover_assigns_or_queues_and_tells_the_flow() {
    let stack = Stack::start().await;
    let shop = stack.create_shop("flows", 1, false).await;
    stack.add_agent("flows", "fay").await;
    stack.flows.set_secret(&shop.callback_secret);
    // A permission applied while the first handover runs drains the queue concurrently, and
    // the flow may then hear "assigned" twice, which this test's count of calls cannot allow.
    stack.wait_candidate("flows", "fay").await;

    // The customer's message alone assigns nobody: the bot talks first.
    let c1 = Conversation::new(Channel::WhatsApp, "31600000021");
    stack.customer_says(&shop, &c1, "hi bot").await;
    stack
        .wait_conversation("flows", "fay", &c1.conversation_id, |c| {
            c.state == pb::ConversationState::WaitingForHandover as i32
        })
        .await;

    let handover = |c: &Conversation| Handover {
        conversation_id: c.conversation_id.clone(),
        msisdn: c.msisdn.clone(),
        channel_id: c.channel_id.clone(),
        reason: "human please".into(),
    };
    let (status, _) = call_handover(
        &stack.http,
        &stack.ingress_url,
        "flows",
        &shop.handover_secret,
        &handover(&c1),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    stack
        .wait_conversation("flows", "fay", &c1.conversation_id, assigned_to("fay"))
        .await;
    // The Redis side of the permission follows its record by a moment: if the handover ran in
    // between, the flow first heard that nobody was available, then the assignment when the
    // permission drained the queue. Either way its last word is fay. Later calls are counted
    // from here.
    let calls = eventually(Duration::from_secs(20), || async {
        let calls = stack.flows.calls();
        calls
            .iter()
            .any(|c| c.field("event").as_deref() == Some("employee_assigned"))
            .then_some(calls)
    })
    .await
    .expect("the flow hears that fay took the conversation");
    let base = calls.len();
    assert!(
        base == 1
            || (base == 2 && calls[0].field("event").as_deref() == Some("no_employee_available")),
        "one assignment, or a wait then the assignment: {calls:#?}"
    );
    let assigned = &calls[base - 1];
    assert_eq!(
        assigned.field("event").as_deref(),
        Some("employee_assigned")
    );
    assert_eq!(assigned.field("employee_id").as_deref(), Some("fay"));
    assert_eq!(
        assigned.signature,
        Some(Ok(())),
        "signed with the shop's callback secret"
    );

    // A handover that finds fay full: the flow learns it waits, with its queue position.
    let c2 = Conversation::new(Channel::WhatsApp, "31600000022");
    stack.customer_says(&shop, &c2, "hi bot").await;
    let (status, _) = call_handover(
        &stack.http,
        &stack.ingress_url,
        "flows",
        &shop.handover_secret,
        &handover(&c2),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let calls = stack
        .flows
        .wait_for_calls(base + 1, Duration::from_secs(20))
        .await;
    assert_eq!(
        calls[base].field("event").as_deref(),
        Some("no_employee_available")
    );
    assert_eq!(calls[base].field("queue_position").as_deref(), Some("1"));

    // The flow retries its step: state is unchanged, the current result is re-emitted.
    call_handover(
        &stack.http,
        &stack.ingress_url,
        "flows",
        &shop.handover_secret,
        &handover(&c2),
    )
    .await
    .unwrap();
    let calls = stack
        .flows
        .wait_for_calls(base + 2, Duration::from_secs(20))
        .await;
    assert_eq!(calls.len(), base + 2, "one call per handover: {calls:#?}");
    assert_eq!(
        calls[base + 1].field("event").as_deref(),
        Some("no_employee_available")
    );
    let mine = stack
        .dialogs("flows", "fay", DialogFilter::Mine)
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);

    // A handover that overtook the customer's message creates the conversation.
    let early = Conversation::new(Channel::WhatsApp, "31600000023");
    call_handover(
        &stack.http,
        &stack.ingress_url,
        "flows",
        &shop.handover_secret,
        &handover(&early),
    )
    .await
    .unwrap();
    stack
        .wait_conversation("flows", "fay", &early.conversation_id, |c| {
            c.state == pb::ConversationState::WaitingForEmployee as i32
        })
        .await;

    // Wrong secret: refused, nothing published.
    let (status, _) = call_handover(
        &stack.http,
        &stack.ingress_url,
        "flows",
        "not-the-secret",
        &handover(&c2),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);

    // fay closes: the oldest waiting conversation is hers, and the flow is told.
    let first = stack
        .wait_conversation("flows", "fay", &c1.conversation_id, |_| true)
        .await;
    close(&stack, &first.conversation_id, "fay").await;
    stack
        .wait_conversation("flows", "fay", &c2.conversation_id, assigned_to("fay"))
        .await;
    let calls = stack
        .flows
        .wait_for_calls(base + 3, Duration::from_secs(20))
        .await;
    let last = calls.last().unwrap();
    assert_eq!(last.field("event").as_deref(), Some("employee_assigned"));
    assert_eq!(last.field("from_queue").as_deref(), Some("true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_conversations_reopen_or_start_anew_per_setting() {
    let stack = Stack::start().await;
    let fresh = stack.create_shop_with("fresh", 5, true, true).await;
    let reopen = stack.create_shop_with("reopen", 5, true, false).await;
    stack.add_agent("fresh", "fred").await;
    stack.add_agent("reopen", "rita").await;

    for (shop, agent, new_on_closed) in [(&fresh, "fred", true), (&reopen, "rita", false)] {
        let c = Conversation::new(Channel::WhatsApp, "31600000031");
        stack.customer_says(shop, &c, "first").await;
        let first = stack
            .wait_conversation(&shop.id, agent, &c.conversation_id, assigned_to(agent))
            .await;
        close(&stack, &first.conversation_id, agent).await;
        stack.customer_says(shop, &c, "again").await;
        let again = stack
            .wait_conversation(&shop.id, agent, &c.conversation_id, |c| {
                c.state != pb::ConversationState::Closed as i32
            })
            .await;
        if new_on_closed {
            assert_ne!(
                again.conversation_id, first.conversation_id,
                "a new conversation"
            );
            let all = stack
                .dialogs(&shop.id, agent, DialogFilter::All)
                .await
                .unwrap();
            assert_eq!(all.len(), 2);
        } else {
            assert_eq!(
                again.conversation_id, first.conversation_id,
                "the closed one reopened"
            );
        }
        // Either way the customer is the same, recognised by phone number.
        assert_eq!(
            again.customer.as_ref().map(|c| c.msisdn.clone()),
            Some("31600000031".to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_types_notify_and_linked_history_needs_only_a_role() {
    let stack = Stack::start().await;
    let shop = stack.create_shop("media", 3, true).await;
    stack.add_agent("media", "uma").await;
    // vic has a role at the shop but no Chat permission.
    stack
        .config_client()
        .await
        .upsert_employee_role(authed(
            pb::UpsertEmployeeRoleRequest {
                shop_id: "media".into(),
                employee_id: "vic".into(),
                role: pb::Role::ShopEmployee as i32,
                display_name: "Vic".into(),
            },
            OWNER,
        ))
        .await
        .unwrap();

    let c = Conversation::new(Channel::WhatsApp, "31600000041");
    stack.customer_says(&shop, &c, "look at this").await;
    let record = stack
        .wait_conversation("media", "uma", &c.conversation_id, assigned_to("uma"))
        .await;
    let mut routing = stack.routing_client().await;
    let mut events = routing
        .subscribe_events(authed(
            pb::SubscribeEventsRequest { after_sequence: 0 },
            "uma",
        ))
        .await
        .unwrap()
        .into_inner();
    let image = Content::Image {
        url: "https://media.example.com/p.jpg".into(),
        caption: "broken".into(),
    };
    let status = stack
        .send_webhook(
            &shop,
            &c.inbound(&uuid::Uuid::new_v4().simple().to_string(), &image),
        )
        .await;
    assert_eq!(status, 200);
    let notice = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.next().await {
            if let Ok(pb::EmployeeEvent {
                event: Some(pb::employee_event::Event::UnsupportedMessage(u)),
                ..
            }) = event
            {
                return Some(u);
            }
        }
        None
    })
    .await
    .expect("a notice within the bound")
    .expect("stream open");
    assert_eq!(notice.r#type, "image");

    let messages = routing
        .list_messages(authed(
            pb::ListMessagesRequest {
                conversation_id: record.conversation_id.clone(),
                page: None,
            },
            "uma",
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert!(messages.iter().any(|m| m.r#type == "image" && !m.supported));

    // Linking an order; vic (role, no Chat) reads history by order and by customer, but
    // cannot list the shop's dialogs.
    routing
        .link_conversation(authed(
            pb::LinkConversationRequest {
                conversation_id: record.conversation_id.clone(),
                link: Some(pb::HistoryLink {
                    target: Some(pb::history_link::Target::OrderId("order-7".into())),
                }),
            },
            "uma",
        ))
        .await
        .unwrap();
    let denied = stack
        .dialogs("media", "vic", DialogFilter::All)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    for target in [
        pb::history_link::Target::OrderId("order-7".into()),
        pb::history_link::Target::CustomerId(record.customer.clone().unwrap().customer_id),
    ] {
        let history = routing
            .get_linked_history(authed(
                pb::GetLinkedHistoryRequest {
                    shop_id: "media".into(),
                    link: Some(pb::HistoryLink {
                        target: Some(target),
                    }),
                    page: None,
                },
                "vic",
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(history.conversations.len(), 1);
        assert!(history.conversations[0].messages.len() >= 2);
    }
    // Someone without any role at the shop gets nothing.
    let stranger = routing
        .get_linked_history(authed(
            pb::GetLinkedHistoryRequest {
                shop_id: "media".into(),
                link: Some(pb::HistoryLink {
                    target: Some(pb::history_link::Target::OrderId("order-7".into())),
                }),
                page: None,
            },
            "stranger",
        ))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_use_text_inside_the_window_and_the_template_outside() {
    let stack = Stack::start().await;
    let shop = stack.create_shop("replies", 5, true).await;
    stack.add_agent("replies", "rex").await;
    let mut routing = stack.routing_client().await;

    let recent = Conversation::new(Channel::WhatsApp, "31600000051");
    stack.customer_says(&shop, &recent, "quick question").await;
    let old = Conversation::new(Channel::WhatsApp, "31600000052");
    // The customer's last message was created 25 hours ago (MessageBird's createdDatetime).
    let mut body = old.inbound(
        &uuid::Uuid::new_v4().simple().to_string(),
        &Content::Text("yesterday's question".into()),
    );
    let long_ago = (chrono::Utc::now() - chrono::Duration::hours(25))
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    body["message"]["createdDatetime"] = serde_json::Value::String(long_ago);
    assert_eq!(stack.send_webhook(&shop, &body).await, 200);

    for (conversation, expected) in [(&recent, "text"), (&old, "hsm")] {
        let record = stack
            .wait_conversation(
                "replies",
                "rex",
                &conversation.conversation_id,
                assigned_to("rex"),
            )
            .await;
        let before = stack.api.requests().len();
        routing
            .reply(authed(
                pb::ReplyRequest {
                    conversation_id: record.conversation_id.clone(),
                    text: "Here is the answer".into(),
                    client_message_id: uuid::Uuid::new_v4().to_string(),
                },
                "rex",
            ))
            .await
            .unwrap();
        let sent = eventually(Duration::from_secs(20), || async {
            stack.api.requests().get(before).cloned()
        })
        .await
        .expect("flow-callback sent the reply to MessageBird");
        assert_eq!(sent.body["type"], expected, "{:#}", sent.body);
        assert_eq!(
            sent.access_key.as_deref(),
            Some("live_access_key_replies_0123456789")
        );
        if expected == "hsm" {
            assert_eq!(sent.body["content"]["hsm"]["templateName"], "agent_reply");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_a_role_hands_conversations_back_to_the_queue() {
    let stack = Stack::start().await;
    let shop = stack.create_shop("withdraw", 1, true).await;
    stack.add_agent("withdraw", "wes").await;
    let c = Conversation::new(Channel::WhatsApp, "31600000061");
    stack.customer_says(&shop, &c, "help").await;
    let before = stack
        .wait_conversation("withdraw", "wes", &c.conversation_id, assigned_to("wes"))
        .await;

    stack.add_agent("withdraw", "xia").await;
    stack
        .config_client()
        .await
        .withdraw_employee_role(authed(
            pb::WithdrawEmployeeRoleRequest {
                shop_id: "withdraw".into(),
                employee_id: "wes".into(),
            },
            OWNER,
        ))
        .await
        .unwrap();
    // Handed back at its original waiting time, and claimed by the other agent.
    let after = stack
        .wait_conversation("withdraw", "xia", &c.conversation_id, assigned_to("xia"))
        .await;
    assert_eq!(after.conversation_id, before.conversation_id);
    assert_eq!(after.waiting_since, before.waiting_since);
    let denied = stack
        .dialogs("withdraw", "wes", DialogFilter::Mine)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}
