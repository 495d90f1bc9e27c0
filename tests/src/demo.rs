//! The `make run` demo: seeds shops, employees and settings through the config service, then
//! plays customers writing over WhatsApp and the web widget (signed webhooks to ingress), an
//! unsupported image, a flow handover, an agent reply, and agents closing conversations so the
//! queue drains, while a compact live view shows what the system did.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Context;
use shopctrl_proto::v1::{
    self as pb, config_service_client::ConfigServiceClient,
    conversation_service_client::ConversationServiceClient,
};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

use crate::{
    conversations_api::ConversationsApi,
    flow_receiver::{FlowReceiver, Handover, call_handover},
    webhooks::{self, Content},
};

/// Where the demo finds the stack.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub config_grpc: String,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    pub routing_grpc: String,
    /// ingress's base URL (also the public base URL the webhooks are signed for).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingress: String,
    /// The `shopctrl` caller's service token.
    #[arg(long, default_value = "dev-shopctrl-token")]
    pub token: String,
    /// Where the simulated Conversations API listens (flow-callback's MESSAGEBIRD_API_BASE_URL).
    #[arg(long, default_value = "127.0.0.1:9201")]
    pub api_listen: SocketAddr,
    /// Where the simulated flow webhook receiver listens (the shops' Event webhook URL).
    #[arg(long, default_value = "127.0.0.1:9202")]
    pub flow_listen: SocketAddr,
    /// Play the scenario and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Seconds between scenario steps.
    #[arg(long, default_value_t = 1.0)]
    pub pace: f64,
}

struct Shop {
    id: String,
    label: &'static str,
    slots: u32,
    assign_on_first_message: bool,
    signing_key: String,
    handover_secret: String,
}

struct Employee {
    id: String,
    name: &'static str,
    shops: Vec<usize>,
}

struct Demo {
    args: DemoArgs,
    config: ConfigServiceClient<Channel>,
    routing: ConversationServiceClient<Channel>,
    http: reqwest::Client,
    shops: Vec<Shop>,
    employees: Vec<Employee>,
    owner: String,
    api: ConversationsApi,
    flows: FlowReceiver,
    webhooks_sent: u32,
    webhooks_refused: u32,
}

pub(crate) fn authed<T>(message: T, token: &str, employee: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}"))?,
    );
    request
        .metadata_mut()
        .insert("x-shopctrl-employee-id", MetadataValue::try_from(employee)?);
    Ok(request)
}

fn say(line: impl AsRef<str>) {
    let now = chrono::Local::now().format("%H:%M:%S");
    println!("{now}  {}", line.as_ref());
}

/// Runs the demo against a running stack.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let config = ConfigServiceClient::connect(args.config_grpc.clone())
        .await
        .with_context(|| format!("config service at {}", args.config_grpc))?;
    let routing = ConversationServiceClient::connect(args.routing_grpc.clone())
        .await
        .with_context(|| format!("routing service at {}", args.routing_grpc))?;
    let api = ConversationsApi::start_on(args.api_listen)
        .await
        .context("starting the simulated Conversations API")?;
    let flows = FlowReceiver::start_on(args.flow_listen)
        .await
        .context("starting the simulated flow receiver")?;
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let mut demo = Demo {
        args,
        config,
        routing,
        http: reqwest::Client::new(),
        shops: Vec::new(),
        employees: Vec::new(),
        owner: format!("owner-{run_id}"),
        api,
        flows,
        webhooks_sent: 0,
        webhooks_refused: 0,
    };
    println!();
    println!("ShopCtrl Messaging demo (run {run_id})");
    println!(
        "  simulated MessageBird API   http://{}",
        demo.args.api_listen
    );
    println!(
        "  simulated flow receiver     http://{}",
        demo.args.flow_listen
    );
    println!();
    demo.seed(run_id).await?;
    demo.scenario().await?;
    demo.summary().await?;
    if !demo.args.exit_when_done {
        println!();
        println!("The stack keeps running. Explore it, e.g.:");
        println!("  grpcurl -plaintext 127.0.0.1:50051 list");
        println!("  curl -s 127.0.0.1:9102/metrics | grep routing_");
        println!("Press Ctrl-C to stop everything.");
        tokio::signal::ctrl_c().await.ok();
    }
    Ok(())
}

impl Demo {
    async fn pause(&self) {
        tokio::time::sleep(Duration::from_secs_f64(self.args.pace.max(0.0))).await;
    }

    async fn seed(&mut self, run_id: &str) -> anyhow::Result<()> {
        say("seeding: 3 shops, 4 employees (one works for two shops)");
        let plan = [
            ("bakery", 2, true), // assign on first message, 2 slots
            ("bikes", 1, false), // a flow hands conversations over, 1 slot
            ("books", 0, true),  // 0 slots: received, never auto-assigned
        ];
        for (label, slots, assign) in plan {
            self.shops.push(Shop {
                id: format!("{label}-{run_id}"),
                label,
                slots,
                assign_on_first_message: assign,
                signing_key: format!("signing-key-{label}-{run_id}-0123456789"),
                handover_secret: String::new(),
            });
        }
        self.employees = vec![
            Employee {
                id: format!("alice-{run_id}"),
                name: "alice",
                shops: vec![0, 1],
            },
            Employee {
                id: format!("bob-{run_id}"),
                name: "bob",
                shops: vec![0],
            },
            Employee {
                id: format!("carol-{run_id}"),
                name: "carol",
                shops: vec![1],
            },
            Employee {
                id: format!("dana-{run_id}"),
                name: "dana",
                shops: vec![2],
            },
        ];
        let token = self.args.token.clone();
        let owner = self.owner.clone();
        for index in 0..self.shops.len() {
            let shop_id = self.shops[index].id.clone();
            self.config
                .upsert_employee_role(authed(
                    pb::UpsertEmployeeRoleRequest {
                        shop_id: shop_id.clone(),
                        employee_id: owner.clone(),
                        role: pb::Role::ShopOwnerAdmin as i32,
                        display_name: "Owner".into(),
                    },
                    &token,
                    &owner,
                )?)
                .await
                .context("upsert owner role")?;
            let flow_url = self.flows.url(&format!("flow-{}", self.shops[index].label));
            let shop = &self.shops[index];
            self.config
                .update_shop_settings(authed(
                    pb::UpdateShopSettingsRequest {
                        shop_id: shop_id.clone(),
                        expected_version: 0,
                        workspace_id: Some(format!("ws{}", run_id)),
                        access_key: Some(format!("live_demo_access_key_{run_id}_{}", shop.label)),
                        signing_key: Some(shop.signing_key.clone()),
                        assign_on_first_message: Some(shop.assign_on_first_message),
                        event_webhook_url: Some(flow_url),
                        whatsapp_template_name: Some("agent_reply".into()),
                        whatsapp_template_namespace: Some(
                            "20332cd4_f095_b080_d255_35677159aaff".into(),
                        ),
                        whatsapp_template_language: Some("en".into()),
                        new_conversation_on_closed: Some(true),
                        conversation_slots: Some(shop.slots),
                        legacy_signature_enabled: Some(false),
                    },
                    &token,
                    &owner,
                )?)
                .await
                .with_context(|| format!("settings of {shop_id}"))?;
            let handover = self
                .config
                .rotate_handover_secret(authed(
                    pb::RotateSecretRequest {
                        shop_id: shop_id.clone(),
                    },
                    &token,
                    &owner,
                )?)
                .await?
                .into_inner();
            self.shops[index].handover_secret = handover.secret;
            let callback = self
                .config
                .rotate_callback_secret(authed(
                    pb::RotateSecretRequest {
                        shop_id: shop_id.clone(),
                    },
                    &token,
                    &owner,
                )?)
                .await?
                .into_inner();
            // One receiver serves every shop's flow; the demo's shops share it, so the newest
            // secret is the one it verifies with (bikes, the only shop using flows, is last-but-one;
            // signatures of other shops are not checked in the demo).
            if self.shops[index].label == "bikes" {
                self.flows.set_secret(&callback.secret);
            }
            let shop = &self.shops[index];
            say(format!(
                "  shop {:<16} slots {}  {}",
                shop.id,
                shop.slots,
                if shop.assign_on_first_message {
                    "assign on first message"
                } else {
                    "waits for a flow handover"
                }
            ));
        }
        for employee in &self.employees {
            for &shop_index in &employee.shops {
                let shop_id = self.shops[shop_index].id.clone();
                self.config
                    .upsert_employee_role(authed(
                        pb::UpsertEmployeeRoleRequest {
                            shop_id: shop_id.clone(),
                            employee_id: employee.id.clone(),
                            role: pb::Role::ShopEmployee as i32,
                            display_name: employee.name.into(),
                        },
                        &token,
                        &owner,
                    )?)
                    .await?;
                self.config
                    .set_chat_permission(authed(
                        pb::SetChatPermissionRequest {
                            shop_id,
                            employee_id: employee.id.clone(),
                            chat_permission: true,
                        },
                        &token,
                        &owner,
                    )?)
                    .await?;
            }
            let shops: Vec<&str> = employee
                .shops
                .iter()
                .map(|i| self.shops[*i].label)
                .collect();
            say(format!(
                "  employee {:<6} Chat permission at {}",
                employee.name,
                shops.join(", ")
            ));
        }
        // Routing learns about the settings through config-changed events.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    async fn send_webhook(&mut self, shop: usize, body: serde_json::Value) -> anyhow::Result<u16> {
        let shop = &self.shops[shop];
        let body = serde_json::to_vec(&body)?;
        let path = webhooks::webhook_path(&shop.id);
        let signed = webhooks::sign_webhook(&self.args.ingress, &path, &body, &shop.signing_key);
        let mut request = self.http.post(&signed.url).body(signed.body.clone());
        for (name, value) in &signed.headers {
            request = request.header(name, value);
        }
        let status = request.send().await?.status().as_u16();
        if status == 200 {
            self.webhooks_sent += 1;
        } else {
            self.webhooks_refused += 1;
        }
        Ok(status)
    }

    async fn customer_writes(
        &mut self,
        shop: usize,
        conversation: &webhooks::Conversation,
        content: Content,
        who: &str,
    ) -> anyhow::Result<()> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let status = self
            .send_webhook(shop, conversation.inbound(&id, &content))
            .await?;
        let what = content.expected_text().map_or_else(
            || format!("[{}]", content.to_json().0),
            |t| format!("\"{t}\""),
        );
        say(format!(
            "{who:<22} → {:<16} {what:<34} ingress answered {status}",
            self.shops[shop].id
        ));
        Ok(())
    }

    async fn scenario(&mut self) -> anyhow::Result<()> {
        println!();
        say("scenario: customers start writing");
        let mut bakery = Vec::new();
        for i in 0..6 {
            let conversation = webhooks::Conversation::new(
                webhooks::Channel::WhatsApp,
                &format!("3161234{:04}", 1000 + i),
            );
            self.customer_writes(
                0,
                &conversation,
                Content::Text(format!("Do you have bread #{i}?")),
                &format!("WhatsApp customer {i}"),
            )
            .await?;
            bakery.push(conversation);
            self.pause().await;
        }
        let visitor = webhooks::Conversation::new(webhooks::Channel::WebWidget, "");
        self.customer_writes(
            0,
            &visitor,
            Content::Text("Hi from the web widget".into()),
            "web widget visitor",
        )
        .await?;
        self.customer_writes(
            0,
            &bakery[0],
            Content::Image {
                url: "https://media.example.com/bread.jpg".into(),
                caption: "this one?".into(),
            },
            "WhatsApp customer 0",
        )
        .await?;
        self.live_view().await?;
        self.pause().await;

        say("books has 0 slots: its conversation is stored but nobody gets it");
        let reader = webhooks::Conversation::new(webhooks::Channel::WhatsApp, "31687654321");
        self.customer_writes(
            2,
            &reader,
            Content::Text("Is the new novel in?".into()),
            "WhatsApp customer 7",
        )
        .await?;
        self.pause().await;

        say("bikes hands conversations over through a flow: the bot talks first");
        let riders = [
            webhooks::Conversation::new(webhooks::Channel::WhatsApp, "31611110001"),
            webhooks::Conversation::new(webhooks::Channel::WhatsApp, "31611110002"),
        ];
        for (i, rider) in riders.iter().enumerate() {
            self.customer_writes(
                1,
                rider,
                Content::Text("My chain broke".into()),
                &format!("bike rider {i}"),
            )
            .await?;
            let (status, answer) = call_handover(
                &self.http,
                &self.args.ingress,
                &self.shops[1].id,
                &self.shops[1].handover_secret,
                &Handover {
                    conversation_id: rider.conversation_id.clone(),
                    msisdn: rider.msisdn.clone(),
                    channel_id: rider.channel_id.clone(),
                    reason: "asked for a human".into(),
                },
            )
            .await?;
            say(format!(
                "flow handover for rider {i}         ingress answered {status} {answer}"
            ));
            self.pause().await;
        }
        let calls = self.flows.wait_for_calls(2, Duration::from_secs(5)).await;
        for call in &calls {
            say(format!(
                "flow webhook received: {}",
                ["event", "employee_name", "queue_position", "from_queue"]
                    .iter()
                    .filter_map(|k| call.field(k).map(|v| format!("{k}={v}")))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        self.live_view().await?;

        say("an agent replies; flow-callback delivers it to MessageBird");
        self.reply_first_assigned().await?;
        self.pause().await;

        say("agents close their conversations: the queue drains");
        for round in 0..3 {
            let closed = self.close_some().await?;
            if closed == 0 {
                break;
            }
            say(format!("round {round}: closed {closed} conversation(s)"));
            self.pause().await;
            self.live_view().await?;
        }
        Ok(())
    }

    async fn dialogs(
        &mut self,
        shop: usize,
        filter: pb::DialogFilter,
    ) -> anyhow::Result<Vec<pb::Conversation>> {
        // Any employee with Chat permission there may list; dana for books, alice otherwise.
        let viewer = match shop {
            2 => self.employees[3].id.clone(),
            1 => self.employees[2].id.clone(),
            _ => self.employees[1].id.clone(),
        };
        let response = self
            .routing
            .list_dialogs(authed(
                pb::ListDialogsRequest {
                    shop_id: self.shops[shop].id.clone(),
                    filter: filter as i32,
                    page: Some(pb::PageRequest {
                        page_size: 200,
                        page_token: String::new(),
                    }),
                },
                &self.args.token,
                &viewer,
            )?)
            .await?;
        Ok(response.into_inner().conversations)
    }

    async fn live_view(&mut self) -> anyhow::Result<()> {
        let mut open: BTreeMap<String, u32> = BTreeMap::new();
        let mut waiting = Vec::new();
        for shop in 0..self.shops.len() {
            let all = self.dialogs(shop, pb::DialogFilter::All).await?;
            let mut queue = 0;
            for conversation in &all {
                match pb::ConversationState::try_from(conversation.state) {
                    Ok(pb::ConversationState::Assigned) => {
                        let who = conversation
                            .assignee
                            .as_ref()
                            .map(|a| a.employee_id.clone())
                            .unwrap_or_default();
                        *open.entry(who).or_default() += 1;
                    }
                    Ok(pb::ConversationState::WaitingForEmployee)
                    | Ok(pb::ConversationState::WaitingForHandover) => queue += 1,
                    _ => {}
                }
            }
            waiting.push(format!("{} {}", self.shops[shop].label, queue));
        }
        let employees: Vec<String> = self
            .employees
            .iter()
            .map(|e| {
                let limit = e
                    .shops
                    .iter()
                    .map(|s| self.shops[*s].slots)
                    .max()
                    .unwrap_or(0);
                format!(
                    "{} {}/{}",
                    e.name,
                    open.get(&e.id).copied().unwrap_or(0),
                    limit
                )
            })
            .collect();
        println!(
            "         ┌ open/limit: {}\n         │ waiting:    {}\n         └ webhooks accepted {}  refused {}  flow events delivered {}  MessageBird sends {}",
            employees.join("  "),
            waiting.join("  "),
            self.webhooks_sent,
            self.webhooks_refused,
            self.flows.calls().len(),
            self.api.requests().len(),
        );
        Ok(())
    }

    async fn reply_first_assigned(&mut self) -> anyhow::Result<()> {
        let mine = self.dialogs(0, pb::DialogFilter::All).await?;
        let Some(conversation) = mine.iter().find(|c| c.assignee.is_some()) else {
            say("  nobody is assigned yet; no reply sent");
            return Ok(());
        };
        let agent = conversation
            .assignee
            .as_ref()
            .map(|a| a.employee_id.clone())
            .unwrap_or_default();
        let reply = self
            .routing
            .reply(authed(
                pb::ReplyRequest {
                    conversation_id: conversation.conversation_id.clone(),
                    text: "Yes, fresh from the oven!".into(),
                    client_message_id: uuid::Uuid::new_v4().to_string(),
                },
                &self.args.token,
                &agent,
            )?)
            .await?;
        say(format!(
            "  {agent} replied in {} (message {})",
            conversation.conversation_id,
            reply
                .into_inner()
                .message
                .map(|m| m.message_id)
                .unwrap_or_default()
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.api.requests().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(request) = self.api.requests().last() {
            say(format!(
                "  MessageBird API received POST {} (answered {})",
                request.path, request.status
            ));
        }
        Ok(())
    }

    /// Each employee closes one of their open conversations.
    async fn close_some(&mut self) -> anyhow::Result<u32> {
        let mut closed = 0;
        let mut done = std::collections::HashSet::new();
        for shop in 0..self.shops.len() {
            for conversation in self.dialogs(shop, pb::DialogFilter::All).await? {
                let Some(assignee) = conversation
                    .assignee
                    .as_ref()
                    .map(|a| a.employee_id.clone())
                else {
                    continue;
                };
                if conversation.state != pb::ConversationState::Assigned as i32
                    || !done.insert(assignee.clone())
                {
                    continue;
                }
                self.routing
                    .close_conversation(authed(
                        pb::CloseConversationRequest {
                            conversation_id: conversation.conversation_id.clone(),
                        },
                        &self.args.token,
                        &assignee,
                    )?)
                    .await?;
                closed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(closed)
    }

    async fn summary(&mut self) -> anyhow::Result<()> {
        println!();
        say("summary");
        self.live_view().await?;
        for shop in 0..self.shops.len() {
            let all = self.dialogs(shop, pb::DialogFilter::All).await?;
            let unassigned = self.dialogs(shop, pb::DialogFilter::Unassigned).await?;
            let reasons: Vec<String> = unassigned
                .iter()
                .map(|c| {
                    pb::UnassignedReason::try_from(c.unassigned_reason)
                        .map(|r| {
                            r.as_str_name()
                                .trim_start_matches("UNASSIGNED_REASON_")
                                .to_lowercase()
                        })
                        .unwrap_or_default()
                })
                .collect();
            say(format!(
                "  {:<16} conversations {}  unassigned {} {}",
                self.shops[shop].id,
                all.len(),
                unassigned.len(),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!("({})", reasons.join(", "))
                }
            ));
        }
        Ok(())
    }
}
