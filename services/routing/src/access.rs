//! Routing's local copy of the config service's data: each shop's routing settings, its
//! members (role, Chat permission, name) and employees' presence, in PostgreSQL tables. A
//! shop is fetched with `GetRoutingShop` when first needed or when its copy is older than the
//! refresh interval; `ConfigChanged` events keep it current in between. The config service
//! sits behind [`ConfigSource`] so tests can serve a fake.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use shopctrl_proto::v1::{
    ConfigChanged, EmployeeAccess, GetEmployeeAccessRequest, GetInternalShopRequest, Role,
    RoutingShop, config_changed::Change,
    config_internal_service_client::ConfigInternalServiceClient,
};
use sqlx::{PgConnection, PgPool, Row};
use tonic::{metadata::MetadataValue, transport::Channel};

/// Why the config service could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    #[error("config service unavailable: {0}")]
    Unavailable(String),
    #[error("config service refused the call: {0}")]
    Refused(String),
}

/// The config service's internal API as routing uses it.
pub trait ConfigSource: Send + Sync + 'static {
    /// The shop's routing data; `None` when the config service does not know the shop.
    fn routing_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RoutingShop>, ConfigSourceError>>;
    /// One employee's role and Chat flag at one shop.
    fn employee_access<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: &'a str,
    ) -> BoxFuture<'a, Result<EmployeeAccess, ConfigSourceError>>;
}

/// The real config service over gRPC (connects lazily, so routing starts without it).
#[derive(Clone)]
pub struct GrpcConfigSource {
    client: ConfigInternalServiceClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl GrpcConfigSource {
    pub fn new(url: &str, token: &str) -> Result<Self, ConfigSourceError> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| ConfigSourceError::Unavailable(format!("bad CONFIG_GRPC_URL: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5));
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| ConfigSourceError::Unavailable("token is not valid metadata".into()))?;
        Ok(Self {
            client: ConfigInternalServiceClient::new(endpoint.connect_lazy()),
            authorization,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }
}

fn classify(status: tonic::Status) -> ConfigSourceError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Internal
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled => ConfigSourceError::Unavailable(status.message().to_owned()),
        _ => ConfigSourceError::Refused(format!("{:?}: {}", status.code(), status.message())),
    }
}

impl ConfigSource for GrpcConfigSource {
    fn routing_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RoutingShop>, ConfigSourceError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            match client
                .get_routing_shop(self.request(GetInternalShopRequest {
                    shop_id: shop_id.to_owned(),
                }))
                .await
            {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                Err(status) => Err(classify(status)),
            }
        })
    }

    fn employee_access<'a>(
        &'a self,
        shop_id: &'a str,
        employee_id: &'a str,
    ) -> BoxFuture<'a, Result<EmployeeAccess, ConfigSourceError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            client
                .get_employee_access(self.request(GetEmployeeAccessRequest {
                    shop_id: shop_id.to_owned(),
                    employee_id: employee_id.to_owned(),
                }))
                .await
                .map(tonic::Response::into_inner)
                .map_err(classify)
        })
    }
}

/// Why the local copy could not answer.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Source(#[from] ConfigSourceError),
}

impl AccessError {
    /// Infrastructure trouble (retry later) rather than an answer.
    pub fn is_transient(&self) -> bool {
        match self {
            AccessError::Database(error) => crate::store::is_transient(error),
            AccessError::Source(ConfigSourceError::Unavailable(_)) => true,
            AccessError::Source(ConfigSourceError::Refused(_)) => false,
        }
    }
}

/// A shop's routing settings as stored locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopSettings {
    pub shop_id: String,
    pub enabled: bool,
    pub assign_on_first_message: bool,
    pub new_conversation_on_closed: bool,
    pub conversation_slots: u32,
    pub version: u64,
}

/// An employee's standing at a shop as stored locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub employee_id: String,
    pub role: Role,
    pub chat_permission: bool,
    pub display_name: String,
}

/// The local copy and how it is refreshed.
#[derive(Clone)]
pub struct Directory {
    pool: PgPool,
    source: Arc<dyn ConfigSource>,
    refresh: Duration,
}

impl Directory {
    pub fn new(pool: PgPool, source: Arc<dyn ConfigSource>, refresh: Duration) -> Self {
        Self {
            pool,
            source,
            refresh,
        }
    }

    /// How old the local copy of a shop's settings may be before it is fetched again.
    pub fn refresh(&self) -> Duration {
        self.refresh
    }

    /// The shop's settings, fetched from the config service when missing or stale. A stale
    /// copy is used when the config service is unreachable; `None` means the shop is unknown.
    pub async fn shop(&self, shop_id: &str) -> Result<Option<ShopSettings>, AccessError> {
        let row = sqlx::query(
            "select shop_id, enabled, assign_on_first_message, new_conversation_on_closed,
                    conversation_slots, version,
                    refreshed_at < now() - make_interval(secs => $2) as stale
             from shop_settings where shop_id = $1",
        )
        .bind(shop_id)
        .bind(self.refresh.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        let local = match &row {
            Some(row) => Some((settings_from_row(row)?, row.try_get::<bool, _>("stale")?)),
            None => None,
        };
        match local {
            Some((settings, false)) => Ok(Some(settings)),
            Some((settings, true)) => match self.fetch(shop_id).await {
                Ok(fresh) => Ok(fresh),
                Err(error) if error.is_transient() => {
                    tracing::warn!(%shop_id, %error, "config service unreachable; using the stale local copy");
                    Ok(Some(settings))
                }
                Err(error) => Err(error),
            },
            None => self.fetch(shop_id).await,
        }
    }

    /// Fetches the shop from the config service and replaces the local copy. Fetches of one
    /// shop are serialized (a transaction-scoped advisory lock held across the call), so the
    /// copy written last was also read last: a slow fetch cannot put back an older state over
    /// a newer one that a config event brought in meanwhile.
    pub async fn fetch(&self, shop_id: &str) -> Result<Option<ShopSettings>, AccessError> {
        let mut tx = self.pool.begin().await?;
        lock_shop(&mut tx, shop_id).await?;
        let Some(shop) = self.source.routing_shop(shop_id).await? else {
            return Ok(None);
        };
        store_routing_shop(&mut tx, &shop).await?;
        tx.commit().await?;
        Ok(Some(ShopSettings {
            shop_id: shop.shop_id,
            enabled: shop.enabled,
            assign_on_first_message: shop.assign_on_first_message,
            new_conversation_on_closed: shop.new_conversation_on_closed,
            conversation_slots: shop.conversation_slots,
            version: shop.version,
        }))
    }

    /// The employee's standing at the shop (`None`: no role there).
    pub async fn member(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<Option<Member>, AccessError> {
        if self.shop(shop_id).await?.is_none() {
            return Ok(None);
        }
        let row = sqlx::query(
            "select employee_id, role, chat_permission, display_name
             from shop_members where shop_id = $1 and employee_id = $2",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| member_from_row(&row))
            .transpose()
            .map_err(Into::into)
    }

    /// Asks the config service directly (used when the local copy says no, so a grant whose
    /// event is still on its way is not refused) and stores the answer.
    pub async fn confirm_member(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<Option<Member>, AccessError> {
        let mut tx = self.pool.begin().await?;
        lock_shop(&mut tx, shop_id).await?;
        let access = self.source.employee_access(shop_id, employee_id).await?;
        let role = Role::try_from(access.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            sqlx::query("delete from shop_members where shop_id = $1 and employee_id = $2")
                .bind(shop_id)
                .bind(employee_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(None);
        }
        sqlx::query(
            "insert into shop_members (shop_id, employee_id, role, chat_permission)
             values ($1, $2, $3, $4)
             on conflict (shop_id, employee_id)
             do update set role = excluded.role, chat_permission = excluded.chat_permission",
        )
        .bind(shop_id)
        .bind(employee_id)
        .bind(role as i16)
        .bind(access.chat_permission)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.member(shop_id, employee_id).await
    }

    /// Applies a member change (role or Chat permission) announced by a config event. The
    /// event says who changed; the state is read again from the config service, because
    /// member events carry no order of their own and an older event (or an older fetch)
    /// must not overwrite a newer grant. When the config service is unreachable the event's
    /// own content is applied instead, and the next fetch corrects it if needed.
    pub async fn member_changed(&self, event: &ConfigChanged) -> Result<AccessChange, AccessError> {
        let employee_id = match &event.change {
            Some(Change::Role(role)) => role.employee_id.as_str(),
            Some(Change::Permission(permission)) => permission.employee_id.as_str(),
            _ => {
                let mut conn = self.pool.acquire().await?;
                return Ok(apply_config_changed(&mut conn, event).await?);
            }
        };
        let shop_id = event.shop_id.as_str();
        match self.fetch(shop_id).await {
            Ok(_) => {}
            Err(error) if error.is_transient() => {
                tracing::warn!(%shop_id, %error, "config service unreachable; applying the event as sent");
                let mut conn = self.pool.acquire().await?;
                return Ok(apply_config_changed(&mut conn, event).await?);
            }
            Err(error) => return Err(error),
        }
        // Judged by the state after, not by a difference: the local copy may already hold the
        // new state (a fetch or an access check got there first), and both answers are
        // idempotent for the assigner.
        let shop_id = shop_id.to_owned();
        let employee_id = employee_id.to_owned();
        Ok(match self.stored_chat(&shop_id, &employee_id).await? {
            Some(true) => AccessChange::CapacityChanged {
                shop_id,
                employee_id: Some(employee_id),
            },
            Some(false) | None => AccessChange::Withdrawn {
                shop_id,
                employee_id,
            },
        })
    }

    /// The stored Chat flag of a member (`None`: no role at the shop in the local copy).
    async fn stored_chat(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<Option<bool>, sqlx::Error> {
        sqlx::query_scalar(
            "select chat_permission from shop_members where shop_id = $1 and employee_id = $2",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&self.pool)
        .await
    }
}

/// Serializes writers of one shop's local copy until the transaction ends.
async fn lock_shop(conn: &mut PgConnection, shop_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtext('routing-shop:' || $1))")
        .bind(shop_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(crate) fn settings_from_row(row: &sqlx::postgres::PgRow) -> Result<ShopSettings, sqlx::Error> {
    Ok(ShopSettings {
        shop_id: row.try_get("shop_id")?,
        enabled: row.try_get("enabled")?,
        assign_on_first_message: row.try_get("assign_on_first_message")?,
        new_conversation_on_closed: row.try_get("new_conversation_on_closed")?,
        conversation_slots: u32::try_from(row.try_get::<i32, _>("conversation_slots")?)
            .unwrap_or(0),
        version: u64::try_from(row.try_get::<i64, _>("version")?).unwrap_or(0),
    })
}

fn member_from_row(row: &sqlx::postgres::PgRow) -> Result<Member, sqlx::Error> {
    Ok(Member {
        employee_id: row.try_get("employee_id")?,
        role: Role::try_from(i32::from(row.try_get::<i16, _>("role")?))
            .unwrap_or(Role::Unspecified),
        chat_permission: row.try_get("chat_permission")?,
        display_name: row.try_get("display_name")?,
    })
}

fn version_i64(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

/// Replaces the local copy of one shop (settings and every member) with `shop`.
pub async fn store_routing_shop(
    conn: &mut PgConnection,
    shop: &RoutingShop,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into shop_settings (shop_id, enabled, assign_on_first_message,
                                    new_conversation_on_closed, conversation_slots, version, refreshed_at)
         values ($1, $2, $3, $4, $5, $6, now())
         on conflict (shop_id) do update set
            enabled = excluded.enabled,
            assign_on_first_message = excluded.assign_on_first_message,
            new_conversation_on_closed = excluded.new_conversation_on_closed,
            conversation_slots = excluded.conversation_slots,
            version = excluded.version,
            refreshed_at = now()",
    )
    .bind(&shop.shop_id)
    .bind(shop.enabled)
    .bind(shop.assign_on_first_message)
    .bind(shop.new_conversation_on_closed)
    .bind(i32::try_from(shop.conversation_slots).unwrap_or(i32::MAX))
    .bind(version_i64(shop.version))
    .execute(&mut *conn)
    .await?;
    // The members in two statements whatever their number: a member change refetches the
    // whole shop, so per-member statements made each change cost as much as the shop is big.
    let members: Vec<_> = shop
        .employees
        .iter()
        .filter(|e| e.role != Role::Unspecified as i32)
        .collect();
    let ids: Vec<&str> = members.iter().map(|e| e.employee_id.as_str()).collect();
    let roles: Vec<i16> = members
        .iter()
        .map(|e| i16::try_from(e.role).unwrap_or(0))
        .collect();
    let chat: Vec<bool> = members.iter().map(|e| e.chat_permission).collect();
    let names: Vec<&str> = members.iter().map(|e| e.display_name.as_str()).collect();
    sqlx::query("delete from shop_members where shop_id = $1 and employee_id <> all($2)")
        .bind(&shop.shop_id)
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    // Only new or changed members reach the upsert: a conflicting row is locked (and logged)
    // even when its update is skipped, and most refetches change one member or none.
    sqlx::query(
        "insert into shop_members (shop_id, employee_id, role, chat_permission, display_name)
         select $1, m.employee_id, m.role, m.chat_permission, m.display_name
         from (select distinct on (employee_id) employee_id, role, chat_permission, display_name
               from unnest($2::text[], $3::int2[], $4::bool[], $5::text[])
                    with ordinality as g(employee_id, role, chat_permission, display_name, ord)
               order by employee_id, ord desc) m
         left join shop_members s on s.shop_id = $1 and s.employee_id = m.employee_id
         where s.employee_id is null
            or (s.role, s.chat_permission, s.display_name)
               is distinct from (m.role, m.chat_permission, m.display_name)
         order by m.employee_id
         on conflict (shop_id, employee_id) do update set role = excluded.role,
            chat_permission = excluded.chat_permission, display_name = excluded.display_name",
    )
    .bind(&shop.shop_id)
    .bind(&ids)
    .bind(&roles)
    .bind(&chat)
    .bind(&names)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What a config change means for routing beyond the stored copy (acted on after commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessChange {
    Nothing,
    /// Slots raised, a permission granted: waiting conversations may now find someone.
    CapacityChanged {
        shop_id: String,
        employee_id: Option<String>,
    },
    /// The employee lost the role or the Chat permission at the shop.
    Withdrawn {
        shop_id: String,
        employee_id: String,
    },
}

/// Applies one ConfigChanged event to the local copy. Settings changes older than the stored
/// version are ignored (events may overtake a fresh GetRoutingShop).
pub async fn apply_config_changed(
    conn: &mut PgConnection,
    event: &ConfigChanged,
) -> Result<AccessChange, sqlx::Error> {
    let shop_id = event.shop_id.clone();
    match &event.change {
        None | Some(Change::Secret(_)) => Ok(AccessChange::Nothing),
        Some(Change::Settings(settings)) => {
            let previous: Option<i32> = sqlx::query_scalar(
                "select conversation_slots from shop_settings where shop_id = $1",
            )
            .bind(&shop_id)
            .fetch_optional(&mut *conn)
            .await?;
            let slots = i32::try_from(settings.conversation_slots).unwrap_or(i32::MAX);
            // Not refreshed_at: the members are not part of this event, and an unknown shop
            // must still be fetched in full when first needed.
            let updated = sqlx::query(
                "update shop_settings set enabled = $2, assign_on_first_message = $3,
                        new_conversation_on_closed = $4, conversation_slots = $5, version = $6
                 where shop_id = $1 and version <= $6",
            )
            .bind(&shop_id)
            .bind(settings.enabled)
            .bind(settings.assign_on_first_message)
            .bind(settings.new_conversation_on_closed)
            .bind(slots)
            .bind(version_i64(event.version))
            .execute(&mut *conn)
            .await?
            .rows_affected();
            match previous {
                // Lowered too: the slot copy must follow (nobody loses conversations).
                Some(before) if updated > 0 && slots != before => {
                    Ok(AccessChange::CapacityChanged {
                        shop_id,
                        employee_id: None,
                    })
                }
                _ => Ok(AccessChange::Nothing),
            }
        }
        Some(Change::Role(role)) => {
            let role_value = Role::try_from(role.role).unwrap_or(Role::Unspecified);
            if role_value == Role::Unspecified {
                sqlx::query("delete from shop_members where shop_id = $1 and employee_id = $2")
                    .bind(&shop_id)
                    .bind(&role.employee_id)
                    .execute(&mut *conn)
                    .await?;
                return Ok(AccessChange::Withdrawn {
                    shop_id,
                    employee_id: role.employee_id.clone(),
                });
            }
            let had_chat: Option<bool> = sqlx::query_scalar(
                "select chat_permission from shop_members where shop_id = $1 and employee_id = $2",
            )
            .bind(&shop_id)
            .bind(&role.employee_id)
            .fetch_optional(&mut *conn)
            .await?;
            sqlx::query(
                "insert into shop_members (shop_id, employee_id, role, chat_permission, display_name)
                 values ($1, $2, $3, $4, $5)
                 on conflict (shop_id, employee_id) do update set role = excluded.role,
                    chat_permission = excluded.chat_permission, display_name = excluded.display_name",
            )
            .bind(&shop_id)
            .bind(&role.employee_id)
            .bind(role_value as i16)
            .bind(role.chat_permission)
            .bind(&role.display_name)
            .execute(&mut *conn)
            .await?;
            Ok(chat_change(
                shop_id,
                &role.employee_id,
                had_chat.unwrap_or(false),
                role.chat_permission,
            ))
        }
        Some(Change::Permission(permission)) => {
            let had_chat: Option<bool> = sqlx::query_scalar(
                "update shop_members m set chat_permission = $3
                 from shop_members old
                 where m.shop_id = $1 and m.employee_id = $2
                   and old.shop_id = m.shop_id and old.employee_id = m.employee_id
                 returning old.chat_permission",
            )
            .bind(&shop_id)
            .bind(&permission.employee_id)
            .bind(permission.chat_permission)
            .fetch_optional(&mut *conn)
            .await?;
            match had_chat {
                // Not a member locally: the next fetch of the shop brings the truth.
                None => Ok(AccessChange::Nothing),
                Some(before) => Ok(chat_change(
                    shop_id,
                    &permission.employee_id,
                    before,
                    permission.chat_permission,
                )),
            }
        }
    }
}

fn chat_change(shop_id: String, employee_id: &str, before: bool, after: bool) -> AccessChange {
    match (before, after) {
        (false, true) => AccessChange::CapacityChanged {
            shop_id,
            employee_id: Some(employee_id.to_owned()),
        },
        (true, false) => AccessChange::Withdrawn {
            shop_id,
            employee_id: employee_id.to_owned(),
        },
        _ => AccessChange::Nothing,
    }
}
