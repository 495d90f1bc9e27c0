//! PostgreSQL access: settings with optimistic concurrency, encrypted secrets, roles and Chat
//! permissions. Every change writes its ConfigChanged event to the outbox in the same
//! transaction, so an event exists exactly when its change committed.

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use prost::Message as _;
use shopctrl_amqp::{OutboxMessage, outbox_enqueue};
use shopctrl_proto::v1::{
    ChatPermissionChanged, ConfigChanged, EmployeeRoleChanged, EventMeta, Role, SecretRotated,
    SettingsChanged, config_changed::Change,
};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    crypto::{KeyRing, Sealed, generate_secret, secret_context},
    error::ServiceError,
    validate::{self, Violations},
};

/// The AMQP `type` of config-changed events (the full protobuf name).
pub const CONFIG_CHANGED_TYPE: &str = "shopctrl.messaging.v1.ConfigChanged";

/// The four secrets a shop has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretName {
    AccessKey,
    SigningKey,
    HandoverSecret,
    CallbackSecret,
}

impl SecretName {
    pub const ALL: [SecretName; 4] = [
        SecretName::AccessKey,
        SecretName::SigningKey,
        SecretName::HandoverSecret,
        SecretName::CallbackSecret,
    ];

    /// Column value and API field name.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretName::AccessKey => "access_key",
            SecretName::SigningKey => "signing_key",
            SecretName::HandoverSecret => "handover_secret",
            SecretName::CallbackSecret => "callback_secret",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == raw)
    }

    /// The visible prefix of secrets we generate, so a leaked one is recognisable.
    fn generated_prefix(self) -> &'static str {
        match self {
            SecretName::HandoverSecret => "shh_",
            SecretName::CallbackSecret => "shc_",
            SecretName::AccessKey | SecretName::SigningKey => "",
        }
    }
}

/// A shop's stored settings (without secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsRecord {
    pub shop_id: String,
    pub workspace_id: String,
    pub assign_on_first_message: bool,
    pub event_webhook_url: String,
    pub whatsapp_template_name: String,
    pub whatsapp_template_namespace: String,
    pub whatsapp_template_language: String,
    pub new_conversation_on_closed: bool,
    pub conversation_slots: u32,
    pub legacy_signature_enabled: bool,
    /// 0 when the shop has no stored settings yet (these are then the defaults).
    pub version: u64,
    pub updated_at: Option<DateTime<Utc>>,
}

impl SettingsRecord {
    /// What a shop without stored settings gets; must match the column defaults.
    pub fn defaults(shop_id: &str) -> Self {
        Self {
            shop_id: shop_id.to_owned(),
            workspace_id: String::new(),
            assign_on_first_message: true,
            event_webhook_url: String::new(),
            whatsapp_template_name: String::new(),
            whatsapp_template_namespace: String::new(),
            whatsapp_template_language: "en".to_owned(),
            new_conversation_on_closed: false,
            conversation_slots: 5,
            legacy_signature_enabled: false,
            version: 0,
            updated_at: None,
        }
    }

    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            shop_id: row.try_get("shop_id")?,
            workspace_id: row.try_get("workspace_id")?,
            assign_on_first_message: row.try_get("assign_on_first_message")?,
            event_webhook_url: row.try_get("event_webhook_url")?,
            whatsapp_template_name: row.try_get("whatsapp_template_name")?,
            whatsapp_template_namespace: row.try_get("whatsapp_template_namespace")?,
            whatsapp_template_language: row.try_get("whatsapp_template_language")?,
            new_conversation_on_closed: row.try_get("new_conversation_on_closed")?,
            conversation_slots: u32::try_from(row.try_get::<i32, _>("conversation_slots")?)
                .unwrap_or(0),
            legacy_signature_enabled: row.try_get("legacy_signature_enabled")?,
            version: u64::try_from(row.try_get::<i64, _>("version")?).unwrap_or(0),
            updated_at: Some(row.try_get("updated_at")?),
        })
    }
}

/// Settings plus the decrypted secrets (kept in memory only for the call).
#[derive(Clone)]
pub struct ShopConfig {
    pub settings: SettingsRecord,
    pub secrets: HashMap<SecretName, String>,
}

impl ShopConfig {
    pub fn secret(&self, name: SecretName) -> &str {
        self.secrets.get(&name).map(String::as_str).unwrap_or("")
    }

    /// Messaging runs once a workspace id and a (live) access key are set.
    pub fn enabled(&self) -> bool {
        !self.settings.workspace_id.is_empty() && !self.secret(SecretName::AccessKey).is_empty()
    }
}

/// The fields an update may change; `None` leaves a field as it is. No `Debug`: it holds
/// secrets in plaintext.
#[derive(Default, Clone)]
pub struct SettingsUpdate {
    pub workspace_id: Option<String>,
    pub access_key: Option<String>,
    pub signing_key: Option<String>,
    pub assign_on_first_message: Option<bool>,
    pub event_webhook_url: Option<String>,
    pub whatsapp_template_name: Option<String>,
    pub whatsapp_template_namespace: Option<String>,
    pub whatsapp_template_language: Option<String>,
    pub new_conversation_on_closed: Option<bool>,
    pub conversation_slots: Option<u32>,
    pub legacy_signature_enabled: Option<bool>,
}

impl SettingsUpdate {
    /// Every rule that depends on one field alone.
    pub fn validate(&self, url_policy: &validate::UrlPolicy) -> Violations {
        let mut v = Violations::default();
        if let Some(x) = &self.workspace_id {
            v.check("workspace_id", validate::workspace_id(x));
        }
        if let Some(x) = &self.access_key {
            v.check("access_key", validate::access_key(x));
        }
        if let Some(x) = &self.signing_key {
            v.check("signing_key", validate::signing_key(x));
        }
        if let Some(x) = &self.event_webhook_url {
            v.check(
                "event_webhook_url",
                validate::event_webhook_url(x, url_policy),
            );
        }
        if let Some(x) = &self.whatsapp_template_name {
            v.check("whatsapp_template_name", validate::template_name(x));
        }
        if let Some(x) = &self.whatsapp_template_namespace {
            v.check(
                "whatsapp_template_namespace",
                validate::template_namespace(x),
            );
        }
        if let Some(x) = &self.whatsapp_template_language {
            v.check("whatsapp_template_language", validate::template_language(x));
        }
        if let Some(x) = self.conversation_slots {
            v.check("conversation_slots", validate::conversation_slots(x));
        }
        v
    }
}

/// One employee's role and Chat flag at a shop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmployeeRecord {
    pub employee_id: String,
    pub display_name: String,
    pub role: Role,
    pub chat_permission: bool,
}

fn role_from_db(value: i16) -> Role {
    Role::try_from(i32::from(value)).unwrap_or(Role::Unspecified)
}

fn role_to_db(role: Role) -> i16 {
    match role {
        Role::ShopOwnerAdmin => 1,
        Role::ShopAdmin => 2,
        Role::ShopEmployee | Role::Unspecified => 3,
    }
}

/// The database side of the service.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    keys: Arc<KeyRing>,
    config_exchange: String,
}

const SETTINGS_COLUMNS: &str = "shop_id, workspace_id, assign_on_first_message, event_webhook_url, \
     whatsapp_template_name, whatsapp_template_namespace, whatsapp_template_language, \
     new_conversation_on_closed, conversation_slots, legacy_signature_enabled, version, updated_at";

impl Store {
    pub fn new(pool: PgPool, keys: Arc<KeyRing>, config_exchange: String) -> Self {
        Self {
            pool,
            keys,
            config_exchange,
        }
    }

    async fn settings_row(
        conn: &mut PgConnection,
        shop_id: &str,
        for_update: bool,
    ) -> Result<Option<SettingsRecord>, sqlx::Error> {
        let lock = if for_update { " for update" } else { "" };
        let sql = format!("select {SETTINGS_COLUMNS} from shop_settings where shop_id = $1{lock}");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(shop_id)
            .fetch_optional(&mut *conn)
            .await?;
        row.as_ref().map(SettingsRecord::from_row).transpose()
    }

    async fn secrets(
        &self,
        conn: &mut PgConnection,
        shop_id: &str,
    ) -> Result<HashMap<SecretName, String>, ServiceError> {
        let rows = sqlx::query(
            "select name, key_id, ciphertext from shop_secret where shop_id = $1 order by name",
        )
        .bind(shop_id)
        .fetch_all(&mut *conn)
        .await?;
        let mut secrets = HashMap::new();
        for row in rows {
            let raw_name: String = row.try_get("name")?;
            let Some(name) = SecretName::parse(&raw_name) else {
                continue;
            };
            let sealed = Sealed {
                key_id: row.try_get("key_id")?,
                ciphertext: row.try_get("ciphertext")?,
            };
            let plain = self
                .keys
                .open(&secret_context(shop_id, name.as_str()), &sealed)?;
            secrets.insert(name, plain);
        }
        Ok(secrets)
    }

    async fn put_secret(
        &self,
        conn: &mut PgConnection,
        shop_id: &str,
        name: SecretName,
        value: &str,
    ) -> Result<(), ServiceError> {
        if value.is_empty() {
            sqlx::query("delete from shop_secret where shop_id = $1 and name = $2")
                .bind(shop_id)
                .bind(name.as_str())
                .execute(&mut *conn)
                .await?;
            return Ok(());
        }
        let sealed = self
            .keys
            .seal(&secret_context(shop_id, name.as_str()), value)?;
        sqlx::query(
            "insert into shop_secret (shop_id, name, key_id, ciphertext) values ($1, $2, $3, $4)
             on conflict (shop_id, name) do update
             set key_id = excluded.key_id, ciphertext = excluded.ciphertext, updated_at = now()",
        )
        .bind(shop_id)
        .bind(name.as_str())
        .bind(&sealed.key_id)
        .bind(&sealed.ciphertext)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Settings and secrets; `None` when the shop has no stored settings.
    pub async fn load(&self, shop_id: &str) -> Result<Option<ShopConfig>, ServiceError> {
        let mut conn = self.pool.acquire().await?;
        let Some(settings) = Self::settings_row(&mut conn, shop_id, false).await? else {
            return Ok(None);
        };
        let secrets = self.secrets(&mut conn, shop_id).await?;
        Ok(Some(ShopConfig { settings, secrets }))
    }

    /// Applies a validated update under the version check.
    pub async fn update_settings(
        &self,
        shop_id: &str,
        expected_version: u64,
        update: &SettingsUpdate,
    ) -> Result<ShopConfig, ServiceError> {
        let mut tx = self.pool.begin().await?;
        let existing = Self::settings_row(&mut tx, shop_id, true).await?;
        let current_version = existing.as_ref().map_or(0, |s| s.version);
        if current_version != expected_version {
            return Err(ServiceError::stale_version(
                shop_id,
                expected_version,
                current_version,
            ));
        }
        let creating = existing.is_none();
        let before = existing.unwrap_or_else(|| SettingsRecord::defaults(shop_id));
        let mut after = before.clone();
        let mut changed: Vec<&'static str> = Vec::new();
        macro_rules! apply {
            ($field:ident) => {
                if let Some(value) = &update.$field
                    && after.$field != *value
                {
                    after.$field = value.to_owned();
                    changed.push(stringify!($field));
                }
            };
        }
        apply!(workspace_id);
        apply!(assign_on_first_message);
        apply!(event_webhook_url);
        apply!(whatsapp_template_name);
        apply!(whatsapp_template_namespace);
        apply!(whatsapp_template_language);
        apply!(new_conversation_on_closed);
        apply!(conversation_slots);
        apply!(legacy_signature_enabled);
        // Secrets are write-only: any value sent counts as a change (no comparison needed).
        let secret_updates = [
            (SecretName::AccessKey, &update.access_key),
            (SecretName::SigningKey, &update.signing_key),
        ];
        for (name, value) in &secret_updates {
            if value.is_some() {
                changed.push(name.as_str());
            }
        }

        // A template needs both its name and its namespace.
        let mut violations = Violations::default();
        if after.whatsapp_template_name.is_empty() != after.whatsapp_template_namespace.is_empty() {
            let missing = if after.whatsapp_template_name.is_empty() {
                "whatsapp_template_name"
            } else {
                "whatsapp_template_namespace"
            };
            violations.add(
                missing,
                "the WhatsApp template name and namespace must be set (or cleared) together",
            );
        }
        if !violations.is_empty() {
            return Err(ServiceError::Invalid(violations.into_vec()));
        }

        if changed.is_empty() && !creating {
            // Nothing to do: no new version, no event.
            let secrets = self.secrets(&mut tx, shop_id).await?;
            tx.commit().await?;
            return Ok(ShopConfig {
                settings: before,
                secrets,
            });
        }

        let sql = if creating {
            format!(
                "insert into shop_settings (shop_id, workspace_id, assign_on_first_message,
                    event_webhook_url, whatsapp_template_name, whatsapp_template_namespace,
                    whatsapp_template_language, new_conversation_on_closed, conversation_slots,
                    legacy_signature_enabled, version)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1)
                 on conflict (shop_id) do nothing
                 returning {SETTINGS_COLUMNS}"
            )
        } else {
            format!(
                "update shop_settings set workspace_id = $2, assign_on_first_message = $3,
                    event_webhook_url = $4, whatsapp_template_name = $5,
                    whatsapp_template_namespace = $6, whatsapp_template_language = $7,
                    new_conversation_on_closed = $8, conversation_slots = $9,
                    legacy_signature_enabled = $10, version = version + 1, updated_at = now()
                 where shop_id = $1
                 returning {SETTINGS_COLUMNS}"
            )
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(shop_id)
            .bind(&after.workspace_id)
            .bind(after.assign_on_first_message)
            .bind(&after.event_webhook_url)
            .bind(&after.whatsapp_template_name)
            .bind(&after.whatsapp_template_namespace)
            .bind(&after.whatsapp_template_language)
            .bind(after.new_conversation_on_closed)
            .bind(i32::try_from(after.conversation_slots).unwrap_or(i32::MAX))
            .bind(after.legacy_signature_enabled)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            // Another admin created the settings between our read and our insert.
            return Err(ServiceError::stale_version(shop_id, expected_version, 1));
        };
        let stored = SettingsRecord::from_row(&row)?;
        for (name, value) in secret_updates {
            if let Some(value) = value {
                self.put_secret(&mut tx, shop_id, name, value).await?;
            }
        }
        let secrets = self.secrets(&mut tx, shop_id).await?;
        let config = ShopConfig {
            settings: stored,
            secrets,
        };
        let change = Change::Settings(SettingsChanged {
            fields: changed.iter().map(|f| (*f).to_owned()).collect(),
            conversation_slots: config.settings.conversation_slots,
            assign_on_first_message: config.settings.assign_on_first_message,
            new_conversation_on_closed: config.settings.new_conversation_on_closed,
            enabled: config.enabled(),
        });
        self.enqueue_change(&mut tx, shop_id, config.settings.version, change)
            .await?;
        tx.commit().await?;
        tracing::info!(shop_id, fields = ?changed, version = config.settings.version, "settings changed");
        Ok(config)
    }

    /// Generates, stores and returns a new handover or callback secret (also the first one).
    pub async fn rotate_secret(
        &self,
        shop_id: &str,
        name: SecretName,
    ) -> Result<(String, u64), ServiceError> {
        let secret = generate_secret(name.generated_prefix())?;
        let mut tx = self.pool.begin().await?;
        // Creates the settings row with defaults when the shop has none yet.
        let version: i64 = sqlx::query_scalar(
            "insert into shop_settings (shop_id) values ($1)
             on conflict (shop_id) do update
             set version = shop_settings.version + 1, updated_at = now()
             returning version",
        )
        .bind(shop_id)
        .fetch_one(&mut *tx)
        .await?;
        let version = u64::try_from(version).unwrap_or(0);
        self.put_secret(&mut tx, shop_id, name, &secret).await?;
        let change = Change::Secret(SecretRotated {
            secret: name.as_str().to_owned(),
        });
        self.enqueue_change(&mut tx, shop_id, version, change)
            .await?;
        tx.commit().await?;
        tracing::info!(shop_id, secret = name.as_str(), version, "secret rotated");
        Ok((secret, version))
    }

    /// The acting employee's role at a shop, if any.
    pub async fn role_of(&self, shop_id: &str, employee_id: &str) -> Result<Role, ServiceError> {
        let role: Option<i16> = sqlx::query_scalar(
            "select role from employee_role where shop_id = $1 and employee_id = $2",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(role.map_or(Role::Unspecified, role_from_db))
    }

    async fn settings_version(conn: &mut PgConnection, shop_id: &str) -> Result<u64, sqlx::Error> {
        let version: Option<i64> =
            sqlx::query_scalar("select version from shop_settings where shop_id = $1")
                .bind(shop_id)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(version.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    }

    pub async fn upsert_role(
        &self,
        shop_id: &str,
        employee_id: &str,
        role: Role,
        display_name: &str,
    ) -> Result<EmployeeRecord, ServiceError> {
        let mut tx = self.pool.begin().await?;
        let previous: Option<(i16, String)> = sqlx::query_as(
            "select role, display_name from employee_role
             where shop_id = $1 and employee_id = $2 for update",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(
            "insert into employee_role (shop_id, employee_id, role, display_name)
             values ($1, $2, $3, $4)
             on conflict (shop_id, employee_id) do update
             set role = excluded.role, display_name = excluded.display_name, updated_at = now()",
        )
        .bind(shop_id)
        .bind(employee_id)
        .bind(role_to_db(role))
        .bind(display_name)
        .execute(&mut *tx)
        .await?;
        let chat_permission = Self::has_chat(&mut tx, shop_id, employee_id).await?;
        let record = EmployeeRecord {
            employee_id: employee_id.to_owned(),
            display_name: display_name.to_owned(),
            role,
            chat_permission,
        };
        let unchanged = previous
            .as_ref()
            .is_some_and(|(r, name)| role_from_db(*r) == role && name == display_name);
        if !unchanged {
            let version = Self::settings_version(&mut tx, shop_id).await?;
            let change = Change::Role(EmployeeRoleChanged {
                employee_id: employee_id.to_owned(),
                role: role as i32,
                chat_permission,
                display_name: display_name.to_owned(),
            });
            self.enqueue_change(&mut tx, shop_id, version, change)
                .await?;
        }
        tx.commit().await?;
        Ok(record)
    }

    /// Removes the Chat permission and then the role, in one transaction, and announces it.
    /// Withdrawing a role that does not exist succeeds without an event (ShopCtrl retries).
    pub async fn withdraw_role(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<EmployeeRecord, ServiceError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("delete from chat_permission where shop_id = $1 and employee_id = $2")
            .bind(shop_id)
            .bind(employee_id)
            .execute(&mut *tx)
            .await?;
        let removed: Option<String> = sqlx::query_scalar(
            "delete from employee_role where shop_id = $1 and employee_id = $2
             returning display_name",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&mut *tx)
        .await?;
        let record = EmployeeRecord {
            employee_id: employee_id.to_owned(),
            display_name: removed.clone().unwrap_or_default(),
            role: Role::Unspecified,
            chat_permission: false,
        };
        if let Some(display_name) = removed {
            let version = Self::settings_version(&mut tx, shop_id).await?;
            let change = Change::Role(EmployeeRoleChanged {
                employee_id: employee_id.to_owned(),
                role: Role::Unspecified as i32,
                chat_permission: false,
                display_name,
            });
            self.enqueue_change(&mut tx, shop_id, version, change)
                .await?;
            tracing::info!(shop_id, employee_id, "role and Chat permission withdrawn");
        }
        tx.commit().await?;
        Ok(record)
    }

    async fn has_chat(
        conn: &mut PgConnection,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "select exists (select 1 from chat_permission where shop_id = $1 and employee_id = $2)",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_one(&mut *conn)
        .await
    }

    /// Every employee with a role at the shop, with their Chat flag.
    pub async fn employees(&self, shop_id: &str) -> Result<Vec<EmployeeRecord>, ServiceError> {
        let rows = sqlx::query(
            "select r.employee_id, r.display_name, r.role, (c.employee_id is not null) as chat
             from employee_role r
             left join chat_permission c
               on c.shop_id = r.shop_id and c.employee_id = r.employee_id
             where r.shop_id = $1
             order by r.employee_id",
        )
        .bind(shop_id)
        .fetch_all(&self.pool)
        .await?;
        let mut employees = Vec::with_capacity(rows.len());
        for row in rows {
            employees.push(EmployeeRecord {
                employee_id: row.try_get("employee_id")?,
                display_name: row.try_get("display_name")?,
                role: role_from_db(row.try_get("role")?),
                chat_permission: row.try_get("chat")?,
            });
        }
        Ok(employees)
    }

    /// Whether the shop has settings or at least one employee role.
    pub async fn shop_known(&self, shop_id: &str) -> Result<bool, ServiceError> {
        Ok(sqlx::query_scalar(
            "select exists (select 1 from shop_settings where shop_id = $1)
                 or exists (select 1 from employee_role where shop_id = $1)",
        )
        .bind(shop_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// One employee's role and Chat flag (role Unspecified when none).
    pub async fn employee(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<EmployeeRecord, ServiceError> {
        let mut conn = self.pool.acquire().await?;
        let role: Option<(i16, String)> = sqlx::query_as(
            "select role, display_name from employee_role where shop_id = $1 and employee_id = $2",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&mut *conn)
        .await?;
        let chat_permission = Self::has_chat(&mut conn, shop_id, employee_id).await?;
        Ok(match role {
            Some((role, display_name)) => EmployeeRecord {
                employee_id: employee_id.to_owned(),
                display_name,
                role: role_from_db(role),
                chat_permission,
            },
            None => EmployeeRecord {
                employee_id: employee_id.to_owned(),
                display_name: String::new(),
                role: Role::Unspecified,
                chat_permission: false,
            },
        })
    }

    /// Grants or removes the Chat permission; only an employee with a role at the shop can
    /// have it (FAILED_PRECONDITION otherwise).
    pub async fn set_chat_permission(
        &self,
        shop_id: &str,
        employee_id: &str,
        chat_permission: bool,
    ) -> Result<EmployeeRecord, ServiceError> {
        let mut tx = self.pool.begin().await?;
        // Locking the role row orders this against a concurrent withdrawal.
        let role: Option<(i16, String)> = sqlx::query_as(
            "select role, display_name from employee_role
             where shop_id = $1 and employee_id = $2 for update",
        )
        .bind(shop_id)
        .bind(employee_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((role, display_name)) = role else {
            if !chat_permission {
                // Nothing to remove; no role means no permission already.
                return Ok(EmployeeRecord {
                    employee_id: employee_id.to_owned(),
                    display_name: String::new(),
                    role: Role::Unspecified,
                    chat_permission: false,
                });
            }
            return Err(ServiceError::FailedPrecondition {
                kind: "ROLE",
                subject: format!("shops/{shop_id}/employees/{employee_id}"),
                message: format!(
                    "employee {employee_id} has no role at shop {shop_id}; only an employee \
                     with a role at the shop can get the Chat permission"
                ),
            });
        };
        let affected = if chat_permission {
            sqlx::query(
                "insert into chat_permission (shop_id, employee_id) values ($1, $2)
                 on conflict do nothing",
            )
            .bind(shop_id)
            .bind(employee_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            sqlx::query("delete from chat_permission where shop_id = $1 and employee_id = $2")
                .bind(shop_id)
                .bind(employee_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
        };
        if affected > 0 {
            let version = Self::settings_version(&mut tx, shop_id).await?;
            let change = Change::Permission(ChatPermissionChanged {
                employee_id: employee_id.to_owned(),
                chat_permission,
            });
            self.enqueue_change(&mut tx, shop_id, version, change)
                .await?;
            tracing::info!(
                shop_id,
                employee_id,
                chat_permission,
                "Chat permission changed"
            );
        }
        tx.commit().await?;
        Ok(EmployeeRecord {
            employee_id: employee_id.to_owned(),
            display_name,
            role: role_from_db(role),
            chat_permission,
        })
    }

    async fn enqueue_change(
        &self,
        conn: &mut PgConnection,
        shop_id: &str,
        version: u64,
        change: Change,
    ) -> Result<(), ServiceError> {
        let event_id = Uuid::now_v7();
        let now = Utc::now();
        let event = ConfigChanged {
            meta: Some(EventMeta {
                event_id: event_id.to_string(),
                occurred_at: Some(prost_types::Timestamp {
                    seconds: now.timestamp(),
                    nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
                }),
                producer: "config".to_owned(),
            }),
            shop_id: shop_id.to_owned(),
            version,
            change: Some(change),
        };
        let message = OutboxMessage {
            event_id,
            exchange: self.config_exchange.clone(),
            // Fanout: the routing key is ignored.
            routing_key: String::new(),
            message_type: CONFIG_CHANGED_TYPE.to_owned(),
            payload: event.encode_to_vec(),
            headers: Vec::new(),
        };
        outbox_enqueue(conn, &message).await?;
        Ok(())
    }

    /// Re-seals every secret with the active key; returns how many were rewritten.
    pub async fn reencrypt_all(&self) -> Result<u64, ServiceError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "select shop_id, name, key_id, ciphertext from shop_secret
             where key_id <> $1 for update",
        )
        .bind(self.keys.active_key_id())
        .fetch_all(&mut *tx)
        .await?;
        let mut rewritten = 0;
        for row in rows {
            let shop_id: String = row.try_get("shop_id")?;
            let name: String = row.try_get("name")?;
            let context = secret_context(&shop_id, &name);
            let plain = self.keys.open(
                &context,
                &Sealed {
                    key_id: row.try_get("key_id")?,
                    ciphertext: row.try_get("ciphertext")?,
                },
            )?;
            let sealed = self.keys.seal(&context, &plain)?;
            sqlx::query(
                "update shop_secret set key_id = $3, ciphertext = $4, updated_at = now()
                 where shop_id = $1 and name = $2",
            )
            .bind(&shop_id)
            .bind(&name)
            .bind(&sealed.key_id)
            .bind(&sealed.ciphertext)
            .execute(&mut *tx)
            .await?;
            rewritten += 1;
        }
        tx.commit().await?;
        Ok(rewritten)
    }
}
