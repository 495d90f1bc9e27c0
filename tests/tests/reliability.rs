//! The fault suite (`make test-reliability`; `make test` runs it too). While a steady stream of
//! signed webhooks and handovers flows in, routing is killed with SIGKILL and restarted, its
//! RabbitMQ connection is cut (a broker restart as routing sees it), its Redis data is lost,
//! its PostgreSQL refuses connections for a few seconds, and the flow webhook answers 500 before
//! it recovers. All faults hit routing through TCP proxies this test controls and its own Redis
//! key prefix; the shared servers are never stopped or flushed.
//!
//! Afterwards: every webhook that got a 2xx is in PostgreSQL exactly once; every automatic claim
//! obeyed the slot rule (from the assignment log); every conversation that could be assigned
//! is; every handover's flow event was delivered. The counts are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use shopctrl_e2e::{
    flow_receiver::{FlowReply, Handover, call_handover},
    webhooks::{Channel, Conversation},
};
use shopctrl_proto::v1 as pb;
use shopctrl_testkit::TcpProxy;
use sqlx::Row;
use support::{Stack, StackOptions, TestShop, authed, eventually};

fn host_port(url: &str) -> String {
    let after_scheme = url.split("://").nth(1).unwrap_or(url);
    let after_user = after_scheme.rsplit('@').next().unwrap_or(after_scheme);
    after_user
        .split(['/', '?'])
        .next()
        .unwrap_or(after_user)
        .to_owned()
}

#[derive(Default)]
struct Sent {
    accepted: Vec<String>,
    refused: u32,
    handovers: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_and_no_slot_rule_is_broken_under_faults() {
    let db_url = shopctrl_testkit::database_url();
    let pg_proxy = TcpProxy::start(&host_port(&db_url)).await;
    let redis_proxy = TcpProxy::start(&host_port(&shopctrl_testkit::redis_url())).await;
    let amqp_proxy = TcpProxy::start(&host_port(&shopctrl_testkit::amqp_url())).await;
    // The database name is only known once the stack made it; routing's URL is patched below.
    let mut stack = Stack::start_with(StackOptions::default()).await;
    let via = |url: &str, proxy: &TcpProxy| url.replace(&host_port(url), &proxy.addr().to_string());
    let routing_env = vec![
        (
            "DATABASE_URL".to_owned(),
            via(stack.backends.db.url(), &pg_proxy),
        ),
        (
            "REDIS_URL".to_owned(),
            via(stack.backends.redis.url(), &redis_proxy),
        ),
        (
            "AMQP_URL".to_owned(),
            via(stack.backends.amqp.url(), &amqp_proxy),
        ),
    ];
    stack.set_routing_env(routing_env).await;

    let a = stack.create_shop("rel-a", 2, true).await;
    let b = stack.create_shop("rel-b", 1, false).await;
    stack.add_agent("rel-a", "ann").await;
    stack.add_agent("rel-b", "ann").await;
    stack.add_agent("rel-a", "ben").await;
    stack.add_agent("rel-b", "cal").await;
    stack.flows.set_secret(&b.callback_secret);
    stack.flows.script((0..5).map(|_| FlowReply::Status {
        status: 500,
        retry_after: None,
    }));

    let sent = Arc::new(Mutex::new(Sent::default()));
    let stop = tokio_util_like::Stop::default();
    let stream = tokio::spawn(stream_traffic(
        stack.http.clone(),
        stack.ingress_url.clone(),
        a.clone(),
        b.clone(),
        sent.clone(),
        stop.clone(),
    ));
    let closer = tokio::spawn(close_now_and_then(stack.routing_grpc.clone(), stop.clone()));

    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("fault: kill -9 routing, restart");
    stack.restart_routing_hard().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("fault: routing's RabbitMQ connection cut for 3 s");
    amqp_proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    amqp_proxy.restore();
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("fault: Redis data lost");
    stack.backends.redis.delete_all().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("fault: PostgreSQL refuses routing for 3 s");
    pg_proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg_proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.stop();
    stream.await.unwrap();
    closer.await.unwrap();

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let pool = stack.backends.db.pool().await;

    // 1. Every accepted webhook is recorded exactly once (bounded wait for the backlog).
    let counts = eventually(Duration::from_secs(90), || async {
        let rows = sqlx::query(
            "select messagebird_message_id, count(*) as n from routing.messages
             where messagebird_message_id = any($1) group by 1",
        )
        .bind(&sent.accepted)
        .fetch_all(&pool)
        .await
        .ok()?;
        let counts: HashMap<String, i64> = rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect();
        (counts.len() == sent.accepted.len()).then_some(counts)
    })
    .await
    .unwrap_or_else(|| panic!("not every accepted webhook reached PostgreSQL"));
    let duplicated = counts.values().filter(|n| **n != 1).count();

    // 2. Every automatic claim happened below the shop's limit.
    let claims = sqlx::query(
        "select kind, open_count, shop_slots, over_limit from routing.assignment_log
         where kind in ('auto', 'handover', 'queue')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let over_limit = claims
        .iter()
        .filter(|r| r.get::<i32, _>(1) >= r.get::<i32, _>(2) || r.get::<bool, _>(3))
        .count();

    // 3. Nobody holds more open conversations than the largest limit of their shops, and every
    //    waiting conversation really has no candidate with room (after the closers stopped).
    let settled = eventually(Duration::from_secs(30), || async {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from routing.conversations c
             where c.state = 'waiting_for_employee' and exists (
               select 1 from routing.shop_members m join routing.shop_settings s using (shop_id)
               where m.shop_id = c.shop_id and m.chat_permission
                 and (select count(*) from routing.conversations o
                      where o.state = 'assigned' and o.assignee_employee_id = m.employee_id)
                     < s.conversation_slots)",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (waiting == 0).then_some(())
    })
    .await;

    // 4. Every handover's flow event reached the flow (after the 500s).
    let delivered: HashSet<String> = stack
        .flows
        .calls()
        .iter()
        .filter(|c| c.status < 300)
        .filter_map(|c| c.field("messagebird_conversation_id"))
        .collect();
    let undelivered = sent
        .handovers
        .iter()
        .filter(|id| !delivered.contains(*id))
        .count();

    println!(
        "reliability: accepted {} refused {} recorded {} duplicated {} | claims {} over limit {} | handovers {} flow events undelivered {} | queue settled {}",
        sent.accepted.len(),
        sent.refused,
        counts.len(),
        duplicated,
        claims.len(),
        over_limit,
        sent.handovers.len(),
        undelivered,
        settled.is_some(),
    );
    assert!(!sent.accepted.is_empty());
    assert_eq!(duplicated, 0, "no webhook recorded twice");
    assert_eq!(over_limit, 0, "no automatic claim over the limit");
    assert!(
        settled.is_some(),
        "a conversation waits although a candidate has room"
    );
    assert_eq!(undelivered, 0, "every handover's flow event delivered");
}

/// Customers of two shops write steadily; rel-b conversations are handed over by a flow.
async fn stream_traffic(
    http: reqwest::Client,
    ingress: String,
    a: TestShop,
    b: TestShop,
    sent: Arc<Mutex<Sent>>,
    stop: tokio_util_like::Stop,
) {
    let conversations: Vec<(bool, Conversation)> = (0..24)
        .map(|i| {
            let channel = if i % 4 == 3 {
                Channel::WebWidget
            } else {
                Channel::WhatsApp
            };
            (
                i % 3 == 0,
                Conversation::new(channel, &format!("316{:08}", 20000 + i)),
            )
        })
        .collect();
    let mut handed_over = HashSet::new();
    let mut round = 0usize;
    while !stop.stopped() {
        let (to_b, conversation) = &conversations[round % conversations.len()];
        let shop = if *to_b { &b } else { &a };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let body = serde_json::to_vec(&conversation.inbound(
            &id,
            &shopctrl_e2e::webhooks::Content::Text(format!("message {round}")),
        ))
        .unwrap();
        let signed = shopctrl_e2e::webhooks::sign_webhook(
            &ingress,
            &shopctrl_e2e::webhooks::webhook_path(&shop.id),
            &body,
            &shop.signing_key,
        );
        let mut request = http.post(&signed.url).body(signed.body.clone());
        for (k, v) in &signed.headers {
            request = request.header(k, v);
        }
        match request.send().await.map(|r| r.status().as_u16()) {
            Ok(200) => sent.lock().unwrap().accepted.push(id),
            _ => sent.lock().unwrap().refused += 1,
        }
        if *to_b && handed_over.insert(conversation.conversation_id.clone()) {
            let handover = Handover {
                conversation_id: conversation.conversation_id.clone(),
                msisdn: conversation.msisdn.clone(),
                ..Handover::default()
            };
            // A flow retries its HTTP step until it gets an answer.
            for _ in 0..50 {
                if let Ok((200, _)) =
                    call_handover(&http, &ingress, &b.id, &b.handover_secret, &handover).await
                {
                    sent.lock()
                        .unwrap()
                        .handovers
                        .push(conversation.conversation_id.clone());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// Agents close a conversation now and then so queues drain during the faults.
async fn close_now_and_then(routing_grpc: String, stop: tokio_util_like::Stop) {
    let mut n = 0u32;
    while !stop.stopped() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let Ok(mut routing) = pb::conversation_service_client::ConversationServiceClient::connect(
            routing_grpc.clone(),
        )
        .await
        else {
            continue;
        };
        for (shop, agent) in [("rel-a", "ann"), ("rel-a", "ben"), ("rel-b", "cal")] {
            let Ok(mine) = routing
                .list_dialogs(authed(
                    pb::ListDialogsRequest {
                        shop_id: shop.into(),
                        filter: pb::DialogFilter::Mine as i32,
                        page: None,
                    },
                    agent,
                ))
                .await
            else {
                continue;
            };
            if let Some(first) = mine.into_inner().conversations.first() {
                n += 1;
                if n.is_multiple_of(2) {
                    let _ = routing
                        .close_conversation(authed(
                            pb::CloseConversationRequest {
                                conversation_id: first.conversation_id.clone(),
                            },
                            agent,
                        ))
                        .await;
                }
            }
        }
    }
}

mod tokio_util_like {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    /// A stop flag shared by the traffic tasks.
    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);

    impl Stop {
        pub fn stop(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        pub fn stopped(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}
