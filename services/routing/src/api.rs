//! The agent API (`ConversationService`). The interceptor authenticated the caller and named
//! the acting employee; every call then checks that employee against routing's local copy of
//! the config data: the Chat permission at the conversation's shop for everything except
//! `GetLinkedHistory` (any role at the shop; the calling ShopCtrl service vouches that the
//! employee may view that customer, order or ticket) and `SetPresence` (ShopCtrl reporting).

use std::{pin::Pin, sync::Arc};

use chrono::Utc;
use futures::Stream;
use shopctrl_amqp::Names;
use shopctrl_domain::EmployeeId;
use shopctrl_proto::v1::{
    AssignConversationRequest, CloseConversationRequest, Conversation, ConversationClosedEvent,
    ConversationHistory, DialogFilter, Direction, EmployeeEvent, GetConversationRequest,
    GetLinkedHistoryRequest, GetLinkedHistoryResponse, LinkConversationRequest, ListDialogsRequest,
    ListDialogsResponse, ListMessagesRequest, ListMessagesResponse, MessageStatus, OutboundSend,
    PageInfo, PageRequest, Presence, ReplyRequest, ReplyResponse, Role, SetPresenceRequest,
    SetPresenceResponse, SubscribeEventsRequest, conversation_service_server::ConversationService,
    employee_event, history_link::Target as LinkKind,
};
use sqlx::{PgPool, Row};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::{
    access::{AccessError, Directory, Member},
    assign::{AssignError, Assigner},
    auth::Acting,
    notify::{self, Hub},
    store::{self, Cursor, DialogScope, LinkTarget, Sink, StoreError},
};

/// Why a call failed, mapped to a gRPC status (internals are logged, never returned).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {description}")]
    InvalidArgument {
        field: &'static str,
        description: String,
    },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field,
            description: description.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if store::is_transient(&error) {
            ApiError::Unavailable(error.to_string())
        } else {
            ApiError::Internal(error.to_string())
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if error.is_transient() {
            ApiError::Unavailable(error.to_string())
        } else {
            ApiError::Internal(error.to_string())
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(error: AccessError) -> Self {
        if error.is_transient() {
            ApiError::Unavailable(error.to_string())
        } else {
            ApiError::Internal(error.to_string())
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {description}"),
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::PermissionDenied(message) => Status::permission_denied(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::ResourceExhausted(message) => Status::resource_exhausted(message),
            ApiError::Unimplemented(message) => Status::unimplemented(message),
            ApiError::Unavailable(message) => {
                tracing::warn!(%message, "request failed on infrastructure");
                Status::unavailable("a backend is unavailable; retry")
            }
            ApiError::Internal(message) => {
                tracing::error!(%message, "request failed");
                Status::internal("internal error")
            }
        }
    }
}

/// The service state.
#[derive(Clone)]
pub struct Api {
    pub pool: PgPool,
    pub directory: Directory,
    pub sink: Sink,
    pub names: Names,
    pub assigner: Arc<dyn Assigner>,
    pub hub: Hub,
    pub shutdown: CancellationToken,
}

fn acting<T>(request: &Request<T>) -> Result<EmployeeId, ApiError> {
    request
        .extensions()
        .get::<Acting>()
        .map(|a| a.employee_id.clone())
        .ok_or_else(|| ApiError::PermissionDenied("no acting employee".into()))
}

fn parse_uuid(field: &'static str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw.trim()).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

fn parse_shop(raw: &str) -> Result<String, ApiError> {
    shopctrl_domain::ShopId::parse(raw.trim())
        .map(String::from)
        .map_err(|e| ApiError::invalid("shop_id", e.to_string()))
}

fn page(page: Option<&PageRequest>) -> Result<(Option<Cursor>, i64), ApiError> {
    let page = page.cloned().unwrap_or_default();
    if page.page_size > 200 {
        return Err(ApiError::invalid("page.page_size", "at most 200"));
    }
    let cursor =
        if page.page_token.is_empty() {
            None
        } else {
            Some(Cursor::decode(&page.page_token).ok_or_else(|| {
                ApiError::invalid("page.page_token", "not a token this API issued")
            })?)
        };
    Ok((cursor, store::page_size(page.page_size)))
}

fn page_info(next: Option<Cursor>) -> Option<PageInfo> {
    Some(PageInfo {
        next_page_token: next.map(|c| c.encode()).unwrap_or_default(),
    })
}

fn link_id(field: &'static str, raw: &str) -> Result<String, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 128 || raw.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "1 to 128 printable characters"));
    }
    Ok(raw.to_owned())
}

impl Api {
    /// The employee's standing at the shop, asking the config service when the local copy
    /// says no (a grant whose event has not arrived yet must not be refused).
    async fn standing(
        &self,
        shop_id: &str,
        employee: &EmployeeId,
    ) -> Result<Option<Member>, ApiError> {
        let local = self.directory.member(shop_id, employee.as_str()).await?;
        if local.as_ref().is_some_and(|m| m.chat_permission) {
            return Ok(local);
        }
        match self
            .directory
            .confirm_member(shop_id, employee.as_str())
            .await
        {
            Ok(confirmed) => Ok(confirmed),
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "config service unreachable; deciding on the local copy");
                Ok(local)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn require_chat(&self, shop_id: &str, employee: &EmployeeId) -> Result<Member, ApiError> {
        match self.standing(shop_id, employee).await? {
            Some(member) if member.chat_permission => Ok(member),
            _ => Err(ApiError::PermissionDenied(format!(
                "employee {employee} has no Chat permission at shop {shop_id}"
            ))),
        }
    }

    async fn require_role(&self, shop_id: &str, employee: &EmployeeId) -> Result<Member, ApiError> {
        match self.standing(shop_id, employee).await? {
            Some(member) if member.role != Role::Unspecified => Ok(member),
            _ => Err(ApiError::PermissionDenied(format!(
                "employee {employee} has no role at shop {shop_id}"
            ))),
        }
    }

    /// The conversation, after checking the Chat permission at its shop: NotFound for an
    /// unknown id, PermissionDenied otherwise (ids are random UUIDs, so telling the two apart
    /// reveals nothing useful).
    async fn conversation_for_chat(
        &self,
        raw_id: &str,
        employee: &EmployeeId,
    ) -> Result<Conversation, ApiError> {
        let id = parse_uuid("conversation_id", raw_id)?;
        let mut conn = self.pool.acquire().await?;
        let conversation = store::load_conversation(&mut conn, id)
            .await?
            .ok_or(ApiError::NotFound("conversation"))?;
        drop(conn);
        self.require_chat(&conversation.shop_id, employee).await?;
        Ok(conversation)
    }

    async fn list_dialogs(
        &self,
        employee: EmployeeId,
        request: ListDialogsRequest,
    ) -> Result<ListDialogsResponse, ApiError> {
        let shop_id = parse_shop(&request.shop_id)?;
        let filter = DialogFilter::try_from(request.filter).unwrap_or(DialogFilter::Unspecified);
        let scope = match filter {
            DialogFilter::Mine => DialogScope::Mine(employee.as_str()),
            DialogFilter::Unassigned => DialogScope::Unassigned,
            DialogFilter::All => DialogScope::All,
            DialogFilter::Unspecified => {
                return Err(ApiError::invalid("filter", "MINE, UNASSIGNED or ALL"));
            }
        };
        let (cursor, limit) = page(request.page.as_ref())?;
        self.require_chat(&shop_id, &employee).await?;
        let mut conn = self.pool.acquire().await?;
        let (conversations, next) =
            store::list_dialogs(&mut conn, &shop_id, scope, cursor.as_ref(), limit).await?;
        Ok(ListDialogsResponse {
            conversations,
            page: page_info(next),
        })
    }

    async fn list_messages(
        &self,
        employee: EmployeeId,
        request: ListMessagesRequest,
    ) -> Result<ListMessagesResponse, ApiError> {
        let (cursor, limit) = page(request.page.as_ref())?;
        let conversation = self
            .conversation_for_chat(&request.conversation_id, &employee)
            .await?;
        let id = parse_uuid("conversation_id", &conversation.conversation_id)?;
        let mut conn = self.pool.acquire().await?;
        let (messages, next) = store::list_messages(&mut conn, id, cursor.as_ref(), limit).await?;
        Ok(ListMessagesResponse {
            messages,
            page: page_info(next),
        })
    }

    async fn linked_history(
        &self,
        employee: EmployeeId,
        request: GetLinkedHistoryRequest,
    ) -> Result<GetLinkedHistoryResponse, ApiError> {
        let shop_id = parse_shop(&request.shop_id)?;
        let target = match request.link.and_then(|l| l.target) {
            Some(LinkKind::CustomerId(id)) => {
                LinkTarget::Customer(parse_uuid("link.customer_id", &id)?)
            }
            Some(LinkKind::OrderId(id)) => LinkTarget::Order(link_id("link.order_id", &id)?),
            Some(LinkKind::TicketId(id)) => LinkTarget::Ticket(link_id("link.ticket_id", &id)?),
            None => {
                return Err(ApiError::invalid(
                    "link",
                    "a customer, order or ticket id is required",
                ));
            }
        };
        let (cursor, limit) = page(request.page.as_ref())?;
        // Only a role: the calling ShopCtrl service vouches for access to the linked object.
        self.require_role(&shop_id, &employee).await?;
        let mut conn = self.pool.acquire().await?;
        let (conversations, next) =
            store::linked_conversations(&mut conn, &shop_id, &target, cursor.as_ref(), limit)
                .await?;
        let mut histories = Vec::with_capacity(conversations.len());
        for conversation in conversations {
            let id = parse_uuid("conversation_id", &conversation.conversation_id)?;
            // The newest 200 messages of each conversation; ListMessages pages further back.
            let (messages, _) = store::list_messages(&mut conn, id, None, 200).await?;
            histories.push(ConversationHistory {
                conversation: Some(conversation),
                messages,
            });
        }
        Ok(GetLinkedHistoryResponse {
            conversations: histories,
            page: page_info(next),
        })
    }

    async fn link(
        &self,
        employee: EmployeeId,
        request: LinkConversationRequest,
    ) -> Result<Conversation, ApiError> {
        let (kind, target) = match request.link.and_then(|l| l.target) {
            Some(LinkKind::OrderId(id)) => ("order", link_id("link.order_id", &id)?),
            Some(LinkKind::TicketId(id)) => ("ticket", link_id("link.ticket_id", &id)?),
            Some(LinkKind::CustomerId(_)) => {
                return Err(ApiError::invalid(
                    "link.customer_id",
                    "customers are linked automatically by phone number",
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    "link",
                    "an order or ticket id is required",
                ));
            }
        };
        let conversation = self
            .conversation_for_chat(&request.conversation_id, &employee)
            .await?;
        let id = parse_uuid("conversation_id", &conversation.conversation_id)?;
        let mut conn = self.pool.acquire().await?;
        sqlx::query(
            "insert into conversation_links (conversation_id, kind, target_id) values ($1, $2, $3)
             on conflict do nothing",
        )
        .bind(id)
        .bind(kind)
        .bind(&target)
        .execute(&mut *conn)
        .await?;
        store::load_conversation(&mut conn, id)
            .await?
            .ok_or(ApiError::NotFound("conversation"))
    }

    async fn close(
        &self,
        employee: EmployeeId,
        request: CloseConversationRequest,
    ) -> Result<Conversation, ApiError> {
        let conversation = self
            .conversation_for_chat(&request.conversation_id, &employee)
            .await?;
        let id = parse_uuid("conversation_id", &conversation.conversation_id)?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "select state, assignee_employee_id from conversations where conversation_id = $1 for update",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let state: String = row.try_get("state")?;
        let previous: Option<String> = row.try_get("assignee_employee_id")?;
        if state == "closed" {
            // Closing twice is not an error: the result is the same.
            tx.rollback().await?;
            return Ok(conversation);
        }
        sqlx::query(
            "update conversations set state = 'closed', closed_at = now(), closed_by_employee_id = $2,
                    assignee_employee_id = null, unassigned_reason = null
             where conversation_id = $1",
        )
        .bind(id)
        .bind(employee.as_str())
        .execute(&mut *tx)
        .await?;
        let closed = store::load_conversation(&mut tx, id)
            .await?
            .ok_or(ApiError::NotFound("conversation"))?;
        if let Some(assignee) = &previous {
            self.sink
                .employee_event(
                    &mut tx,
                    assignee,
                    &closed.shop_id,
                    employee_event::Event::ConversationClosed(ConversationClosedEvent {
                        conversation: Some(closed.clone()),
                    }),
                )
                .await?;
        }
        tx.commit().await?;
        if let Err(error) = self
            .assigner
            .capacity_changed(&closed.shop_id, previous.as_deref())
            .await
        {
            tracing::warn!(%error, "assigner not told about a freed slot");
        }
        Ok(closed)
    }

    async fn assign(
        &self,
        employee: EmployeeId,
        request: AssignConversationRequest,
    ) -> Result<Conversation, ApiError> {
        let target = EmployeeId::parse(request.employee_id.trim())
            .map_err(|e| ApiError::invalid("employee_id", e.to_string()))?;
        let conversation = self
            .conversation_for_chat(&request.conversation_id, &employee)
            .await?;
        let id = parse_uuid("conversation_id", &conversation.conversation_id)?;
        match self
            .assigner
            .manual_assign(id, target.as_str(), request.force)
            .await
        {
            Ok(_) => {}
            Err(AssignError::NoFreeSlot) => {
                return Err(ApiError::ResourceExhausted(
                    "the employee has no free conversation slot".into(),
                ));
            }
            Err(AssignError::NotFound) => return Err(ApiError::NotFound("conversation")),
            Err(AssignError::Refused(message)) => {
                return Err(ApiError::FailedPrecondition(message));
            }
            Err(AssignError::Unsupported) => {
                return Err(ApiError::Unimplemented(
                    "manual assignment is not available yet".into(),
                ));
            }
            Err(AssignError::Unavailable(message)) => return Err(ApiError::Unavailable(message)),
        }
        let mut conn = self.pool.acquire().await?;
        store::load_conversation(&mut conn, id)
            .await?
            .ok_or(ApiError::NotFound("conversation"))
    }

    async fn reply(
        &self,
        employee: EmployeeId,
        request: ReplyRequest,
    ) -> Result<ReplyResponse, ApiError> {
        let text = request.text.trim();
        if text.is_empty() {
            return Err(ApiError::invalid("text", "must not be empty"));
        }
        if text.chars().count() > 4096 {
            return Err(ApiError::invalid("text", "at most 4096 characters"));
        }
        let client_id = request.client_message_id.trim();
        if client_id.len() > 128 {
            return Err(ApiError::invalid(
                "client_message_id",
                "at most 128 characters",
            ));
        }
        let client_id = Some(client_id).filter(|c| !c.is_empty()).map(str::to_owned);
        let conversation = self
            .conversation_for_chat(&request.conversation_id, &employee)
            .await?;
        let id = parse_uuid("conversation_id", &conversation.conversation_id)?;
        if let Some(existing) = self.existing_reply(id, client_id.as_deref()).await? {
            return Ok(ReplyResponse {
                message: Some(existing),
            });
        }
        if conversation.state == shopctrl_proto::v1::ConversationState::Closed as i32 {
            return Err(ApiError::FailedPrecondition(
                "the conversation is closed".into(),
            ));
        }
        let customer = conversation.customer.clone().unwrap_or_default();
        let message_id = Uuid::now_v7();
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "insert into messages (message_id, shop_id, conversation_id, messagebird_conversation_id,
                direction, channel, type, text, supported, content_json, status, raw_status,
                sent_by_employee_id, client_message_id, created_at)
             values ($1, $2, $3, $4, $5, $6, 'text', $7, true, $8, $9, 'pending', $10, $11, $12)
             on conflict (conversation_id, client_message_id) where client_message_id is not null
             do nothing",
        )
        .bind(message_id)
        .bind(&conversation.shop_id)
        .bind(id)
        .bind(&conversation.messagebird_conversation_id)
        .bind(Direction::Sent as i16)
        .bind(i16::try_from(conversation.channel).unwrap_or(0))
        .bind(text)
        .bind(serde_json::json!({ "text": text }).to_string())
        .bind(MessageStatus::Pending as i16)
        .bind(employee.as_str())
        .bind(&client_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // A concurrent retry of the same call won.
            tx.rollback().await?;
            let existing = self.existing_reply(id, client_id.as_deref()).await?;
            return Ok(ReplyResponse { message: existing });
        }
        sqlx::query(
            "update conversations set last_activity_at = greatest(last_activity_at, $2),
                    last_message_preview = $3 where conversation_id = $1",
        )
        .bind(id)
        .bind(now)
        .bind(store::preview(text, "text", true))
        .execute(&mut *tx)
        .await?;
        let customer_key = if customer.msisdn.is_empty() {
            format!("contact:{}", customer.messagebird_contact_id)
        } else {
            customer.msisdn.clone()
        };
        let last_received: Option<chrono::DateTime<Utc>> = sqlx::query_scalar(
            "select received_at from last_received
             where shop_id = $1 and channel_id = $2 and customer_key = $3",
        )
        .bind(&conversation.shop_id)
        .bind(&conversation.channel_id)
        .bind(&customer_key)
        .fetch_optional(&mut *tx)
        .await?;
        let event_id = Uuid::now_v7();
        let send = OutboundSend {
            meta: Some(store::meta(event_id)),
            shop_id: conversation.shop_id.clone(),
            conversation_id: conversation.conversation_id.clone(),
            message_id: message_id.to_string(),
            messagebird_conversation_id: conversation.messagebird_conversation_id.clone(),
            channel: conversation.channel,
            channel_id: conversation.channel_id.clone(),
            msisdn: customer.msisdn.clone(),
            text: text.to_owned(),
            employee_id: employee.to_string(),
            customer_last_received_at: last_received.map(store::to_timestamp),
        };
        self.sink
            .publish(
                &mut tx,
                event_id,
                self.names.outbound_exchange(),
                "send",
                "OutboundSend",
                &send,
            )
            .await?;
        let message = store::load_message(&mut tx, message_id).await?;
        tx.commit().await?;
        Ok(ReplyResponse { message })
    }

    async fn existing_reply(
        &self,
        conversation_id: Uuid,
        client_id: Option<&str>,
    ) -> Result<Option<shopctrl_proto::v1::Message>, ApiError> {
        let Some(client_id) = client_id else {
            return Ok(None);
        };
        let existing: Option<Uuid> = sqlx::query_scalar(
            "select message_id from messages where conversation_id = $1 and client_message_id = $2",
        )
        .bind(conversation_id)
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?;
        match existing {
            Some(message_id) => {
                let mut conn = self.pool.acquire().await?;
                Ok(store::load_message(&mut conn, message_id).await?)
            }
            None => Ok(None),
        }
    }

    async fn set_presence(
        &self,
        employee: EmployeeId,
        request: SetPresenceRequest,
    ) -> Result<SetPresenceResponse, ApiError> {
        let target = if request.employee_id.trim().is_empty() {
            employee
        } else {
            EmployeeId::parse(request.employee_id.trim())
                .map_err(|e| ApiError::invalid("employee_id", e.to_string()))?
        };
        let presence = Presence::try_from(request.presence).unwrap_or(Presence::Unspecified);
        if presence == Presence::Unspecified {
            return Err(ApiError::invalid("presence", "ONLINE, AWAY or OFFLINE"));
        }
        sqlx::query(
            "insert into presence (employee_id, presence, updated_at) values ($1, $2, now())
             on conflict (employee_id) do update set presence = excluded.presence, updated_at = now()",
        )
        .bind(target.as_str())
        .bind(presence as i16)
        .execute(&self.pool)
        .await?;
        // Every change: the slot copy follows presence (away gets nothing new).
        {
            let shops: Vec<String> = sqlx::query_scalar(
                "select shop_id from shop_members where employee_id = $1 and chat_permission",
            )
            .bind(target.as_str())
            .fetch_all(&self.pool)
            .await?;
            for shop_id in shops {
                if let Err(error) = self
                    .assigner
                    .capacity_changed(&shop_id, Some(target.as_str()))
                    .await
                {
                    tracing::warn!(%error, "assigner not told about an employee coming online");
                }
            }
        }
        Ok(SetPresenceResponse {
            employee_id: target.to_string(),
            presence: presence as i32,
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<EmployeeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ConversationService for Api {
    async fn list_dialogs(
        &self,
        request: Request<ListDialogsRequest>,
    ) -> Result<Response<ListDialogsResponse>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            Api::list_dialogs(self, employee, request.into_inner()).await?,
        ))
    }

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let employee = acting(&request)?;
        let conversation = self
            .conversation_for_chat(&request.get_ref().conversation_id, &employee)
            .await?;
        Ok(Response::new(conversation))
    }

    async fn list_messages(
        &self,
        request: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            Api::list_messages(self, employee, request.into_inner()).await?,
        ))
    }

    async fn get_linked_history(
        &self,
        request: Request<GetLinkedHistoryRequest>,
    ) -> Result<Response<GetLinkedHistoryResponse>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            self.linked_history(employee, request.into_inner()).await?,
        ))
    }

    async fn link_conversation(
        &self,
        request: Request<LinkConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            self.link(employee, request.into_inner()).await?,
        ))
    }

    async fn close_conversation(
        &self,
        request: Request<CloseConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            self.close(employee, request.into_inner()).await?,
        ))
    }

    async fn assign_conversation(
        &self,
        request: Request<AssignConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            self.assign(employee, request.into_inner()).await?,
        ))
    }

    async fn reply(
        &self,
        request: Request<ReplyRequest>,
    ) -> Result<Response<ReplyResponse>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            Api::reply(self, employee, request.into_inner()).await?,
        ))
    }

    async fn set_presence(
        &self,
        request: Request<SetPresenceRequest>,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        let employee = acting(&request)?;
        Ok(Response::new(
            Api::set_presence(self, employee, request.into_inner()).await?,
        ))
    }

    type SubscribeEventsStream = EventStream;

    async fn subscribe_events(
        &self,
        request: Request<SubscribeEventsRequest>,
    ) -> Result<Response<Self::SubscribeEventsStream>, Status> {
        let employee = acting(&request)?;
        let after = request.get_ref().after_sequence;
        let (events, receiver) = tokio::sync::mpsc::channel::<EmployeeEvent>(64);
        let pool = self.pool.clone();
        let hub = self.hub.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let end =
                notify::serve_stream(pool, hub, employee.to_string(), after, events, shutdown)
                    .await;
            tracing::debug!(?end, "event stream ended");
        });
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(receiver), Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
