//! The record rules end to end: an inbound event published like ingress does, then what the
//! agent API returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::{Env, Msg, SHOP, as_employee, eventually, shop, status_name};
use shopctrl_proto::v1::{
    CloseConversationRequest, ConversationState, DialogFilter, GetConversationRequest,
    GetLinkedHistoryRequest, HistoryLink, InboundWebhookEvent, LinkConversationRequest,
    ListDialogsRequest, ListMessagesRequest, MessageStatus, PageRequest, UnassignedReason,
    history_link::Target,
};
use shopctrl_routing::consumer::{CommitHook, Committed};
use tonic::Code;

async fn dialogs(
    env: &Env,
    employee: &str,
    filter: DialogFilter,
) -> Result<Vec<shopctrl_proto::v1::Conversation>, tonic::Status> {
    let mut client = env.client().await;
    client
        .list_dialogs(as_employee(
            ListDialogsRequest {
                shop_id: SHOP.into(),
                filter: filter as i32,
                page: None,
            },
            employee,
        ))
        .await
        .map(|r| r.into_inner().conversations)
}

/// Every conversation of a dialog list, read page by page.
async fn all_pages(
    env: &Env,
    filter: DialogFilter,
    page_size: u32,
) -> Vec<shopctrl_proto::v1::Conversation> {
    let mut client = env.client().await;
    let mut token = String::new();
    let mut all = Vec::new();
    loop {
        let page = client
            .list_dialogs(as_employee(
                ListDialogsRequest {
                    shop_id: SHOP.into(),
                    filter: filter as i32,
                    page: Some(PageRequest {
                        page_size,
                        page_token: token.clone(),
                    }),
                },
                "alice",
            ))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.conversations);
        token = page.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            return all;
        }
    }
}

async fn messages(env: &Env, conversation_id: &str) -> Vec<shopctrl_proto::v1::Message> {
    let mut client = env.client().await;
    client
        .list_messages(as_employee(
            ListMessagesRequest {
                conversation_id: conversation_id.into(),
                page: None,
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner()
        .messages
}

#[tokio::test]
async fn a_customer_message_creates_customer_conversation_and_window() {
    // Slots 0: received and stored but never auto-assigned, whichever assigner runs.
    let mut settings = shop(true, false);
    settings.conversation_slots = 0;
    let env = Env::start(settings).await;
    let created = chrono::Utc::now() - chrono::Duration::minutes(3);
    let mut msg = Msg::received("mbconv-1", "mbmsg-1", "Hello, where is my order?");
    msg.created_at = created;
    env.publish(&msg.event()).await;

    let conversations = eventually(20, "the conversation", || async {
        let list = dialogs(&env, "alice", DialogFilter::Unassigned)
            .await
            .ok()?;
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(conversations.len(), 1);
    let conversation = &conversations[0];
    assert_eq!(
        conversation.state,
        ConversationState::WaitingForEmployee as i32
    );
    // Filed in the queue with the reason nobody takes it.
    let conversation = eventually(10, "the unassigned reason", || async {
        let c = dialogs(&env, "alice", DialogFilter::Unassigned)
            .await
            .ok()?
            .remove(0);
        (c.unassigned_reason != UnassignedReason::Unspecified as i32).then_some(c)
    })
    .await;
    assert_eq!(
        conversation.unassigned_reason,
        UnassignedReason::SlotsZero as i32
    );
    let customer = conversation.customer.clone().unwrap();
    assert_eq!(
        customer.msisdn, "31612345678",
        "normalized: digits only, no +"
    );
    assert_eq!(customer.display_name, "Jane");
    assert_eq!(conversation.queue_position, 1);
    assert_eq!(
        conversation.last_message_preview,
        "Hello, where is my order?"
    );

    let stored = messages(&env, &conversation.conversation_id).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].text, "Hello, where is my order?");
    assert_eq!(stored[0].messagebird_message_id, "mbmsg-1");
    assert_eq!(status_name(stored[0].status), MessageStatus::Received);
    assert!(stored[0].supported);

    // The 24-hour window starts from MessageBird's createdDatetime, per channel and MSISDN.
    let received_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "select received_at from last_received where shop_id = $1 and channel_id = 'channel-1'
         and customer_key = '31612345678'",
    )
    .bind(SHOP)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(received_at.timestamp_micros(), created.timestamp_micros());

    // Mine is empty (nobody is assigned); All shows it too.
    assert!(
        dialogs(&env, "alice", DialogFilter::Mine)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        dialogs(&env, "alice", DialogFilter::All)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn without_assign_on_first_message_it_waits_for_a_handover() {
    let env = Env::start(shop(false, false)).await;
    env.publish(&Msg::received("mbconv-h", "m-1", "hi").event())
        .await;
    let conversation = eventually(20, "the conversation", || async {
        dialogs(&env, "alice", DialogFilter::Unassigned)
            .await
            .ok()?
            .pop()
    })
    .await;
    assert_eq!(
        conversation.state,
        ConversationState::WaitingForHandover as i32
    );
    assert_eq!(
        conversation.unassigned_reason,
        UnassignedReason::AwaitingHandover as i32
    );
}

#[tokio::test]
async fn bot_and_agent_messages_are_history_only() {
    let env = Env::start(shop(true, false)).await;
    // The bot greets first: no conversation yet, the message waits for one.
    let mut greeting = Msg::sent("mbconv-2", "bot-1", "Welcome! How can we help?");
    greeting.created_at = chrono::Utc::now() - chrono::Duration::seconds(10);
    env.publish(&greeting.event()).await;
    // Another conversation's greeting: it must stay where it is when mbconv-2 starts.
    env.publish(&Msg::sent("mbconv-2b", "bot-other", "Welcome!").event())
        .await;
    eventually(20, "the bot messages", || async {
        (env.count("select count(*) from messages").await == 2).then_some(())
    })
    .await;
    assert_eq!(env.count("select count(*) from conversations").await, 0);
    assert_eq!(env.count("select count(*) from last_received").await, 0);

    env.publish(&Msg::received("mbconv-2", "cust-1", "I need help").event())
        .await;
    let conversation = eventually(20, "the conversation", || async {
        dialogs(&env, "alice", DialogFilter::All).await.ok()?.pop()
    })
    .await;
    let window_before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select received_at from last_received")
            .fetch_one(&env.pool)
            .await
            .unwrap();

    // A later bot message: stored, but neither the window nor the state move.
    env.publish(&Msg::sent("mbconv-2", "bot-2", "An agent will be with you").event())
        .await;
    let all = eventually(20, "three messages", || async {
        let m = messages(&env, &conversation.conversation_id).await;
        (m.len() == 3).then_some(m)
    })
    .await;
    assert_eq!(
        all.iter()
            .map(|m| m.messagebird_message_id.as_str())
            .collect::<Vec<_>>(),
        ["bot-1", "cust-1", "bot-2"],
        "oldest first"
    );
    let window_after: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select received_at from last_received")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(window_before, window_after);
    assert_eq!(env.count("select count(*) from conversations").await, 1);
    assert_eq!(
        env.count(
            "select count(*) from messages
             where messagebird_message_id = 'bot-other' and conversation_id is null"
        )
        .await,
        1,
        "another conversation's bot message is not attached"
    );
}

#[tokio::test]
async fn duplicates_store_once_and_statuses_only_move_forward() {
    let env = Env::start(shop(true, false)).await;
    let sent = Msg::sent("mbconv-3", "agent-msg", "Your order ships today");
    env.publish(&Msg::received("mbconv-3", "c-1", "hello").event())
        .await;
    for _ in 0..3 {
        env.publish(&Msg::received("mbconv-3", "c-1", "hello").event())
            .await;
    }
    env.publish(&sent.event()).await;
    for status in ["delivered", "read", "delivered", "sent"] {
        let mut update = Msg::sent("mbconv-3", "agent-msg", "Your order ships today");
        update.status = status;
        update.webhook_type = "message.updated";
        env.publish(&update.event()).await;
    }
    // A marker published last: once it is stored, everything before it was applied.
    env.publish(&Msg::received("mbconv-3", "c-2", "marker").event())
        .await;
    eventually(20, "the marker", || async {
        (env.count("select count(*) from messages where messagebird_message_id = 'c-2'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(env.count("select count(*) from messages").await, 3);
    assert_eq!(env.count("select count(*) from conversations").await, 1);
    assert_eq!(env.count("select count(*) from customers").await, 1);
    let status: i16 = sqlx::query_scalar(
        "select status from messages where messagebird_message_id = 'agent-msg'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        status_name(i32::from(status)),
        MessageStatus::Read,
        "read is never downgraded"
    );
}

async fn close(env: &Env, conversation_id: &str) {
    let mut client = env.client().await;
    let closed = client
        .close_conversation(as_employee(
            CloseConversationRequest {
                conversation_id: conversation_id.into(),
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.state, ConversationState::Closed as i32);
}

#[tokio::test]
async fn a_message_to_a_closed_conversation_reopens_it_when_the_setting_is_off() {
    let env = Env::start(shop(true, false)).await;
    env.publish(&Msg::received("mbconv-4", "a-1", "first").event())
        .await;
    let first = eventually(20, "the conversation", || async {
        dialogs(&env, "alice", DialogFilter::All).await.ok()?.pop()
    })
    .await;
    close(&env, &first.conversation_id).await;
    // A bot message to the closed conversation does not reopen it.
    env.publish(&Msg::sent("mbconv-4", "bot-x", "Thanks for chatting").event())
        .await;
    env.publish(&Msg::received("mbconv-4", "a-2", "one more thing").event())
        .await;
    let reopened = eventually(20, "the reopened conversation", || async {
        let list = dialogs(&env, "alice", DialogFilter::All).await.ok()?;
        list.into_iter()
            .find(|c| c.state != ConversationState::Closed as i32)
    })
    .await;
    assert_eq!(reopened.conversation_id, first.conversation_id);
    // Waiting again (or already assigned, when the slot assigner runs).
    assert!(
        reopened.state == ConversationState::WaitingForEmployee as i32
            || reopened.state == ConversationState::Assigned as i32
    );
    assert!(reopened.closed_at.is_none());
    assert_eq!(env.count("select count(*) from conversations").await, 1);
    assert_eq!(messages(&env, &first.conversation_id).await.len(), 3);
}

#[tokio::test]
async fn a_message_to_a_closed_conversation_starts_a_new_one_when_the_setting_is_on() {
    let env = Env::start(shop(true, true)).await;
    env.publish(&Msg::received("mbconv-5", "b-1", "first").event())
        .await;
    let first = eventually(20, "the conversation", || async {
        dialogs(&env, "alice", DialogFilter::All).await.ok()?.pop()
    })
    .await;
    close(&env, &first.conversation_id).await;
    env.publish(&Msg::received("mbconv-5", "b-2", "again").event())
        .await;
    let all = eventually(20, "two conversations", || async {
        let list = dialogs(&env, "alice", DialogFilter::All).await.ok()?;
        (list.len() == 2).then_some(list)
    })
    .await;
    // Newest activity first.
    assert_ne!(all[0].conversation_id, first.conversation_id);
    // Waiting, or already assigned when the slot assigner got to it first.
    assert!(
        all[0].state == ConversationState::WaitingForEmployee as i32
            || all[0].state == ConversationState::Assigned as i32,
        "state {}",
        all[0].state
    );
    assert_eq!(all[1].state, ConversationState::Closed as i32);
    assert_eq!(
        all[0].customer.as_ref().unwrap().customer_id,
        all[1].customer.as_ref().unwrap().customer_id,
        "the same customer"
    );
    assert_eq!(messages(&env, &all[0].conversation_id).await.len(), 1);
}

#[tokio::test]
async fn web_widget_visitors_are_customers_by_contact_id() {
    let env = Env::start(shop(true, false)).await;
    let mut first = Msg::received("widget-conv", "w-1", "hi from the site");
    first.msisdn = String::new();
    first.contact_id = "visitor-42".into();
    let mut second = Msg::received("widget-conv-2", "w-2", "me again");
    second.msisdn = String::new();
    second.contact_id = "visitor-42".into();
    env.publish(&first.event()).await;
    env.publish(&second.event()).await;
    let list = eventually(20, "two conversations", || async {
        let list = dialogs(&env, "alice", DialogFilter::All).await.ok()?;
        (list.len() == 2).then_some(list)
    })
    .await;
    let customer = list[0].customer.clone().unwrap();
    assert_eq!(customer.msisdn, "");
    assert_eq!(customer.messagebird_contact_id, "visitor-42");
    assert_eq!(
        customer.customer_id,
        list[1].customer.clone().unwrap().customer_id
    );
    assert_eq!(env.count("select count(*) from customers").await, 1);
}

#[tokio::test]
async fn list_needs_chat_but_linked_history_needs_only_a_role() {
    let env = Env::start(shop(true, false)).await;
    env.publish(&Msg::received("mbconv-6", "p-1", "order 77 is late").event())
        .await;
    let conversation = eventually(20, "the conversation", || async {
        dialogs(&env, "alice", DialogFilter::All).await.ok()?.pop()
    })
    .await;

    // bob has a role but no Chat permission; carol has no role.
    let denied = dialogs(&env, "bob", DialogFilter::All).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        dialogs(&env, "carol", DialogFilter::All)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let mut client = env.client().await;
    let get = client
        .get_conversation(as_employee(
            GetConversationRequest {
                conversation_id: conversation.conversation_id.clone(),
            },
            "bob",
        ))
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::PermissionDenied);

    let linked = client
        .link_conversation(as_employee(
            LinkConversationRequest {
                conversation_id: conversation.conversation_id.clone(),
                link: Some(HistoryLink {
                    target: Some(Target::OrderId("order-77".into())),
                }),
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(linked.order_ids, ["order-77"]);
    // Customers are linked automatically, not by hand.
    let refused = client
        .link_conversation(as_employee(
            LinkConversationRequest {
                conversation_id: conversation.conversation_id.clone(),
                link: Some(HistoryLink {
                    target: Some(Target::CustomerId(uuid::Uuid::new_v4().to_string())),
                }),
            },
            "alice",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let customer_id = conversation.customer.clone().unwrap().customer_id;
    for target in [
        Target::OrderId("order-77".into()),
        Target::CustomerId(customer_id),
    ] {
        let history = client
            .get_linked_history(as_employee(
                GetLinkedHistoryRequest {
                    shop_id: SHOP.into(),
                    link: Some(HistoryLink {
                        target: Some(target.clone()),
                    }),
                    page: Some(PageRequest {
                        page_size: 10,
                        page_token: String::new(),
                    }),
                },
                "bob",
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(history.conversations.len(), 1, "{target:?}");
        assert_eq!(history.conversations[0].messages.len(), 1);
        assert_eq!(
            history.conversations[0].messages[0].text,
            "order 77 is late"
        );
    }
    let nobody = client
        .get_linked_history(as_employee(
            GetLinkedHistoryRequest {
                shop_id: SHOP.into(),
                link: Some(HistoryLink {
                    target: Some(Target::OrderId("order-77".into())),
                }),
                page: None,
            },
            "carol",
        ))
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::PermissionDenied);
    let none = client
        .get_linked_history(as_employee(
            GetLinkedHistoryRequest {
                shop_id: SHOP.into(),
                link: Some(HistoryLink {
                    target: Some(Target::TicketId("ticket-9".into())),
                }),
                page: None,
            },
            "bob",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(none.conversations.is_empty());
}

#[tokio::test]
async fn callers_must_authenticate_as_shopctrl() {
    let env = Env::start(shop(true, false)).await;
    let mut client = env.client().await;
    let request = || ListDialogsRequest {
        shop_id: SHOP.into(),
        filter: DialogFilter::All as i32,
        page: None,
    };
    let anonymous = client
        .list_dialogs(tonic::Request::new(request()))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let mut as_ingress = tonic::Request::new(request());
    as_ingress.metadata_mut().insert(
        "authorization",
        "Bearer test-ingress-token".parse().unwrap(),
    );
    as_ingress
        .metadata_mut()
        .insert("x-shopctrl-employee-id", "alice".parse().unwrap());
    assert_eq!(
        client.list_dialogs(as_ingress).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let bad_filter = client
        .list_dialogs(as_employee(
            ListDialogsRequest {
                shop_id: SHOP.into(),
                filter: 0,
                page: None,
            },
            "alice",
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_filter.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn dialogs_and_messages_page_newest_activity_first() {
    let env = Env::start(shop(true, false)).await;
    let base = chrono::Utc::now() - chrono::Duration::minutes(10);
    for i in 0..5 {
        let mut m = Msg::received(
            &format!("pconv-{i}"),
            &format!("pm-{i}"),
            &format!("msg {i}"),
        );
        m.created_at = base + chrono::Duration::seconds(i);
        m.msisdn = format!("3161234000{i}");
        env.publish(&m.event()).await;
    }
    for i in 0..5 {
        let mut m = Msg::received("pconv-4", &format!("extra-{i}"), &format!("extra {i}"));
        m.created_at = base + chrono::Duration::seconds(10 + i);
        m.msisdn = "31612340004".into();
        env.publish(&m.event()).await;
    }
    eventually(30, "all messages", || async {
        (env.count("select count(*) from messages").await == 10).then_some(())
    })
    .await;
    let seen: Vec<String> = all_pages(&env, DialogFilter::All, 2)
        .await
        .into_iter()
        .map(|c| c.messagebird_conversation_id)
        .collect();
    assert_eq!(
        seen,
        ["pconv-4", "pconv-3", "pconv-2", "pconv-1", "pconv-0"]
    );

    let conversation_id: uuid::Uuid = sqlx::query_scalar(
        "select conversation_id from conversations where messagebird_conversation_id = 'pconv-4'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let mut client = env.client().await;
    let first = client
        .list_messages(as_employee(
            ListMessagesRequest {
                conversation_id: conversation_id.to_string(),
                page: Some(PageRequest {
                    page_size: 4,
                    page_token: String::new(),
                }),
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    let texts: Vec<_> = first.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["extra 1", "extra 2", "extra 3", "extra 4"]);
    let second = client
        .list_messages(as_employee(
            ListMessagesRequest {
                conversation_id: conversation_id.to_string(),
                page: Some(PageRequest {
                    page_size: 4,
                    page_token: first.page.unwrap().next_page_token,
                }),
            },
            "alice",
        ))
        .await
        .unwrap()
        .into_inner();
    let texts: Vec<_> = second.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["msg 4", "extra 0"]);
    assert!(second.page.unwrap().next_page_token.is_empty());
}

/// The batch of the two batch tests, to be applied after an agent message (`pre-agent` of
/// `mbconv-b0`) was stored: a bot message before the customer's first one, its status moved
/// within the batch (once backwards, ignored), customer messages out of time order with a
/// duplicate, the earlier agent message moved forward (not back), and a bot message after the
/// conversation exists.
fn batch_events(at: impl Fn(i64) -> chrono::DateTime<chrono::Utc>) -> Vec<InboundWebhookEvent> {
    let mut batch = Vec::new();
    // Stored without a conversation, then attached to the one the customer's message creates.
    let mut bot = Msg::sent("mbconv-b1", "bot-1", "Hi, how can we help?");
    bot.created_at = at(0);
    batch.push(bot.event());
    for status in ["delivered", "read", "delivered"] {
        let mut update = Msg::sent("mbconv-b1", "bot-1", "Hi, how can we help?");
        update.created_at = at(0);
        update.status = status;
        update.webhook_type = "message.updated";
        batch.push(update.event());
    }
    // The first starts the conversation; the others must find it in the batch.
    for (id, seconds, text) in [
        ("c-1", 1, "first"),
        ("c-2", 3, "latest"),
        ("c-3", 2, "late"),
    ] {
        let mut m = Msg::received("mbconv-b1", id, text);
        m.created_at = at(seconds);
        batch.push(m.event());
    }
    let mut duplicate = Msg::received("mbconv-b1", "c-1", "first");
    duplicate.created_at = at(1);
    batch.push(duplicate.event());
    for status in ["delivered", "read", "sent"] {
        let mut update = Msg::sent("mbconv-b0", "pre-agent", "stored earlier");
        update.status = status;
        update.webhook_type = "message.updated";
        batch.push(update.event());
    }
    // Joins the conversation at once.
    let mut later_bot = Msg::sent("mbconv-b1", "bot-2", "Someone will be with you");
    later_bot.created_at = at(4);
    batch.push(later_bot.event());
    batch
}

/// Stores the agent message the batch moves, through a running replica.
async fn store_agent_message_before_the_batch(env: &Env) {
    let before = env.spawn(None, None).await;
    env.publish(&Msg::sent("mbconv-b0", "pre-agent", "stored earlier").event())
        .await;
    eventually(20, "the earlier message", || async {
        (env.count("select count(*) from messages where messagebird_message_id = 'pre-agent'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    before.stop().await;
}

/// The record after [`batch_events`], however the batch was split.
async fn assert_batch_outcome(env: &Env, at: impl Fn(i64) -> chrono::DateTime<chrono::Utc>) {
    assert_eq!(env.count("select count(*) from messages").await, 6);
    assert_eq!(
        env.count(
            "select count(*) from conversations where messagebird_conversation_id = 'mbconv-b1'"
        )
        .await,
        1
    );
    assert_eq!(
        env.count(
            "select count(*) from messages where messagebird_conversation_id = 'mbconv-b1'
             and conversation_id is distinct from
                 (select conversation_id from conversations
                  where messagebird_conversation_id = 'mbconv-b1')"
        )
        .await,
        0,
        "every message of the conversation, bots' included, belongs to it"
    );
    let status = |id: &'static str| {
        let pool = env.pool.clone();
        async move {
            let status: i16 =
                sqlx::query_scalar("select status from messages where messagebird_message_id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            status_name(i32::from(status))
        }
    };
    assert_eq!(status("bot-1").await, MessageStatus::Read);
    assert_eq!(status("pre-agent").await, MessageStatus::Read);
    let (activity, preview): (chrono::DateTime<chrono::Utc>, String) = sqlx::query_as(
        "select last_activity_at, last_message_preview from conversations
         where messagebird_conversation_id = 'mbconv-b1'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(activity.timestamp_micros(), at(4).timestamp_micros());
    assert_eq!(
        preview, "Someone will be with you",
        "the last message's preview"
    );
    let (window, window_message): (chrono::DateTime<chrono::Utc>, String) = sqlx::query_as(
        "select received_at, messagebird_message_id from last_received
         where customer_key = '31612345678'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(window.timestamp_micros(), at(3).timestamp_micros());
    assert_eq!(
        window_message, "c-2",
        "the latest customer message starts the window"
    );
}

/// Events queued before routing starts arrive as one or a few batches, whose writes are made
/// together at the end: later events of a batch must still see what earlier ones wrote.
#[tokio::test]
async fn a_batch_applies_its_events_as_if_one_by_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut env = Env::prepare(shop(true, false), 1).await;
    store_agent_message_before_the_batch(&env).await;
    let t0 = chrono::Utc::now() - chrono::Duration::minutes(10);
    let at = |seconds: i64| t0 + chrono::Duration::seconds(seconds);
    for event in &batch_events(at) {
        env.publish(event).await;
    }

    let largest = Arc::new(AtomicUsize::new(0));
    let hook: CommitHook = {
        let largest = largest.clone();
        Arc::new(move |committed: &Committed| {
            let before = largest.fetch_max(committed.received_at.len(), Ordering::SeqCst);
            if before == 0 {
                // A batch is what is already prefetched. On a slow machine the first
                // deliveries can trickle in one at a time; holding the first commit a moment
                // lets the rest arrive (the client's I/O thread keeps receiving), so the next
                // batch holds several events, which is what this test is about.
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        })
    };
    let service = env.spawn(None, Some(hook)).await;
    env.services.push(service);
    eventually(30, "the last bot message", || async {
        (env.count("select count(*) from messages where messagebird_message_id = 'bot-2'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert!(
        largest.load(Ordering::SeqCst) > 1,
        "the queued events were applied in batches"
    );
    assert_batch_outcome(&env, at).await;
    env.stop_all().await;
}

/// The same batch applied in one transaction, exactly as a consumer applies what it took from
/// the queue (one lookup, each event, one flush, the employee events, commit): here the
/// conversation the first customer message starts is certainly still unwritten when the
/// later messages of the batch look for it.
#[tokio::test]
async fn a_batch_in_one_transaction_finds_the_conversation_it_started() {
    use shopctrl_routing::{
        access::{Directory, GrpcConfigSource},
        ingest::{BatchState, Inbound, Ingestor},
        store::Sink,
    };

    // Assign on first message: the conversation the customer starts is one to claim for.
    let env = Env::prepare(shop(true, false), 1).await;
    store_agent_message_before_the_batch(&env).await;
    let t0 = chrono::Utc::now() - chrono::Duration::minutes(10);
    let at = |seconds: i64| t0 + chrono::Duration::seconds(seconds);
    let events: Vec<Inbound> = batch_events(at)
        .into_iter()
        .map(|event| Inbound::Webhook(Box::new(event)))
        .collect();

    let source = GrpcConfigSource::new(&env.config_url, "test-routing-token").unwrap();
    let ingestor = Ingestor {
        directory: Directory::new(
            env.pool.clone(),
            Arc::new(source),
            std::time::Duration::from_secs(60),
        ),
        sink: Sink {
            names: env.names.clone(),
        },
    };
    let mut tx = env.pool.begin().await.unwrap();
    let mut state = BatchState::default();
    ingestor
        .prefetch(&mut tx, &mut state, &events.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let mut started = Vec::new();
    for event in &events {
        let follow_ups = ingestor.apply(&mut tx, &mut state, event).await.unwrap();
        started.extend(follow_ups.started);
    }
    ingestor.flush(&mut tx, &mut state).await.unwrap();
    ingestor
        .sink
        .store_pending(&mut tx, &mut state.events)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(started.len(), 1, "one conversation started: {started:?}");
    let conversation: uuid::Uuid = sqlx::query_scalar(
        "select conversation_id from conversations where messagebird_conversation_id = 'mbconv-b1'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(started[0], conversation);
    assert_batch_outcome(&env, at).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_conversation_is_assigned_by_the_transaction_that_stores_its_first_message() {
    let mut env = Env::prepare(shop(true, false), 2).await;
    // When each batch committed (the hook runs right after the commit, before anything the
    // batch asks of the assigner afterwards).
    let commits = Arc::new(Mutex::new(Vec::<chrono::DateTime<chrono::Utc>>::new()));
    let hook: CommitHook = {
        let commits = commits.clone();
        Arc::new(move |_: &Committed| commits.lock().unwrap().push(chrono::Utc::now()))
    };
    let service = env.spawn(None, Some(hook)).await;
    env.services.push(service);
    // The shop's first conversation also brings its slot copy up to date, which happens
    // after the commit; the second one shows the steady state.
    for (n, conversation) in ["mbconv-first", "mbconv-second"].into_iter().enumerate() {
        env.publish(&Msg::received(conversation, &format!("mbmsg-{n}"), "Hello?").event())
            .await;
        eventually(20, "the assignment", || async {
            (env.count("select count(*) from conversations where state = 'assigned'")
                .await
                == n as i64 + 1)
                .then_some(())
        })
        .await;
    }
    // The claim's statement ran before the commit of the batch that stored the message: the
    // assignment was recorded in that batch, not by a transaction of its own after it.
    let claimed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "select a.created_at from assignment_log a join conversations c using (conversation_id)
         where c.messagebird_conversation_id = 'mbconv-second'
           and c.assignee_employee_id = 'alice' and a.kind = 'auto'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let commits = commits.lock().unwrap().clone();
    let committed_after = commits.iter().filter(|at| **at > claimed_at).count();
    assert_eq!(
        committed_after, 1,
        "only the second conversation's own batch commits after its claim: {commits:?}, claimed at {claimed_at}"
    );
}

/// PostgreSQL runs the batch lookup on its cached (generic) plan once that looks cheaper (large
/// batches), and that plan may be made while the tables are still empty. It must still reach
/// each conversation through an index keyed by the MessageBird conversation id; one made on the
/// shop alone would scan the shop's every conversation for each message until the next ANALYZE.
#[tokio::test]
async fn the_lookups_cached_plan_made_on_empty_tables_is_keyed_by_conversation() {
    let env = Env::start(shop(true, false)).await;
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::raw_sql("set enable_seqscan = off; set plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "prepare lookup(text[], text[], text[], text[], text[], bool[], float8) as {}",
        shopctrl_routing::ingest::LOOKUP
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "explain execute lookup('{shop-1,shop-1}', '{m-1,m-2}', '{c-1,c-2}', \
         '{31612345678,null}', '{null,null}', '{true,false}', 60)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    let conversation_scans: Vec<&str> = plan
        .lines()
        .filter(|line| line.contains("Scan using") && line.contains(" on conversations"))
        .collect();
    // The message's conversation, the open one (locked), the open one (not locked), the latest.
    assert_eq!(conversation_scans.len(), 4, "{plan}");
    for scan in conversation_scans {
        assert!(
            [
                "conversations_pkey",
                "conversations_one_open",
                "conversations_by_mb"
            ]
            .iter()
            .any(|index| scan.contains(&format!("using {index} "))),
            "a conversation read not keyed by its id or MessageBird id: {scan}\n{plan}"
        );
    }
}

/// Queue positions count from the oldest waiting conversation of the same shop, whichever way
/// the conversations are read (a page that does not start at the head of the queue, one by
/// one), and move up when one ahead leaves the queue.
#[tokio::test]
async fn queue_positions_follow_the_waiting_order_in_lists_and_single_reads() {
    let mut settings = shop(true, false);
    settings.conversation_slots = 0;
    let env = Env::start(settings.clone()).await;
    // Another shop's queue, interleaved, counts for nobody here.
    let mut other = settings;
    other.shop_id = "shop-2".into();
    env.config.put(other);
    for i in 0..4 {
        let msg = Msg::received(&format!("mbconv-q{i}"), &format!("mbmsg-q{i}"), "Hello?");
        env.publish(&msg.event()).await;
        let mut elsewhere =
            Msg::received(&format!("mbconv-o{i}"), &format!("mbmsg-o{i}"), "Hi").event();
        elsewhere.shop_id = "shop-2".into();
        env.publish(&elsewhere).await;
    }
    let mut queue = eventually(20, "four waiting conversations", || async {
        let list = dialogs(&env, "alice", DialogFilter::Unassigned)
            .await
            .ok()?;
        (list.len() == 4).then_some(list)
    })
    .await;
    // The queue's order: oldest first, ties by id.
    let key = |c: &shopctrl_proto::v1::Conversation| {
        let since = c.waiting_since.unwrap();
        (since.seconds, since.nanos, c.conversation_id.clone())
    };
    queue.sort_by_key(key);
    let positions: Vec<u32> = queue.iter().map(|c| c.queue_position).collect();
    assert_eq!(positions, vec![1, 2, 3, 4], "the whole queue in one page");
    let expected: std::collections::HashMap<String, u32> = queue
        .iter()
        .map(|c| (c.conversation_id.clone(), c.queue_position))
        .collect();

    // Pages of two (newest activity first): each shows the positions in the whole queue.
    let paged = all_pages(&env, DialogFilter::Unassigned, 2).await;
    assert_eq!(paged.len(), 4);
    for c in &paged {
        assert_eq!(
            c.queue_position, expected[&c.conversation_id],
            "{} in a page of two",
            c.conversation_id
        );
    }
    let mut client = env.client().await;
    for (i, conversation) in queue.iter().enumerate() {
        let single = client
            .get_conversation(as_employee(
                GetConversationRequest {
                    conversation_id: conversation.conversation_id.clone(),
                },
                "alice",
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(single.queue_position, i as u32 + 1, "read on its own");
    }

    client
        .close_conversation(as_employee(
            CloseConversationRequest {
                conversation_id: queue[1].conversation_id.clone(),
            },
            "alice",
        ))
        .await
        .unwrap();
    let mut rest = dialogs(&env, "alice", DialogFilter::Unassigned)
        .await
        .unwrap();
    rest.sort_by_key(key);
    let rest: Vec<(String, u32)> = rest
        .into_iter()
        .map(|c| (c.conversation_id, c.queue_position))
        .collect();
    assert_eq!(
        rest,
        vec![
            (queue[0].conversation_id.clone(), 1),
            (queue[2].conversation_id.clone(), 2),
            (queue[3].conversation_id.clone(), 3),
        ]
    );
}

/// A batch takes its shop's settings from the local copy its lookup reads, as long as that
/// copy is fresh; once it is older than the refresh interval, the settings are fetched again
/// from the config service (here with no config event announcing the change).
#[tokio::test]
async fn inbound_events_use_the_local_shop_settings_until_they_are_due_for_a_refresh() {
    let env = Env::start(shop(true, false)).await;
    // The state of the conversation a customer's message starts.
    let start = |mb_conversation: &'static str, mb_message: &'static str| {
        let env = &env;
        async move {
            env.publish(&Msg::received(mb_conversation, mb_message, "hello").event())
                .await;
            eventually(20, "the conversation", || async {
                sqlx::query_scalar::<_, String>(
                    "select state from conversations where messagebird_conversation_id = $1",
                )
                .bind(mb_conversation)
                .fetch_optional(&env.pool)
                .await
                .unwrap()
            })
            .await
        }
    };
    let first = start("mbconv-s1", "s-1").await;
    assert_ne!(
        first, "waiting_for_handover",
        "assign on first message is on"
    );

    // The config service now says the shop waits for the flow's handover; no event says so.
    env.config.put(shop(false, false));
    let second = start("mbconv-s2", "s-2").await;
    assert_ne!(
        second, "waiting_for_handover",
        "a fresh local copy is used as it is"
    );

    sqlx::query("update shop_settings set refreshed_at = now() - interval '1 day'")
        .execute(&env.pool)
        .await
        .unwrap();
    let third = start("mbconv-s3", "s-3").await;
    assert_eq!(
        third, "waiting_for_handover",
        "a stale local copy is fetched again"
    );
    assert_eq!(
        env.count("select count(*) from shop_settings where not assign_on_first_message")
            .await,
        1,
        "the fetched settings replace the local copy"
    );
}
