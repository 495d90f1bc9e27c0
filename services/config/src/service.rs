//! The gRPC handlers: the admin API (ConfigService) for ShopCtrl acting for an employee, and
//! the internal API (ConfigInternalService) whose answers are scoped by the calling service.
//!
//! Order of checks in every admin call: the service token (interceptor), the ids, the acting
//! employee's role at the shop, then the request body. So a caller without the right learns
//! nothing about what the body would have done.

use std::sync::Arc;

use shopctrl_domain::{EmployeeId, ShopId, last4};
use shopctrl_proto::v1::{
    DeliveryShop, EmployeeAccess, EmployeeRoleResponse, GetEmployeeAccessRequest,
    GetInternalShopRequest, GetShopSettingsRequest, IngressShop, ListPermissionsRequest,
    ListPermissionsResponse, Role, RotateSecretRequest, RotatedSecret, RoutingEmployee,
    RoutingShop, SecretInfo, SetChatPermissionRequest, ShopPermission, ShopSettings,
    UpdateShopSettingsRequest, UpsertEmployeeRoleRequest, WithdrawEmployeeRoleRequest,
    config_internal_service_server::ConfigInternalService, config_service_server::ConfigService,
};
use tonic::{Request, Response, Status};

use crate::{
    auth::{Caller, acting_employee, caller_of},
    error::ServiceError,
    metrics::Metrics,
    store::{EmployeeRecord, SecretName, SettingsRecord, SettingsUpdate, ShopConfig, Store},
    validate::UrlPolicy,
};

const MAX_DISPLAY_NAME: usize = 200;

/// State shared by both gRPC services.
#[derive(Clone)]
pub struct Handlers {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    metrics: Metrics,
    url_policy: UrlPolicy,
}

impl Handlers {
    pub fn new(store: Store, metrics: Metrics, url_policy: UrlPolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                metrics,
                url_policy,
            }),
        }
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Counts the outcome and turns the error into a status.
    fn finish<T>(
        &self,
        method: &str,
        result: Result<T, ServiceError>,
    ) -> Result<Response<T>, Status> {
        let result = result.map(Response::new).map_err(Status::from);
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.inner.metrics.observe(method, code);
        result
    }

    /// Admin calls come from ShopCtrl only.
    fn require_caller<T>(request: &Request<T>, allowed: Caller) -> Result<(), ServiceError> {
        let caller = caller_of(request).map_err(|_| {
            ServiceError::PermissionDenied("the caller is not authenticated".to_owned())
        })?;
        if caller == allowed {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "the {} service token may not call this method",
                caller.name()
            )))
        }
    }

    /// ShopCtrl, acting for an employee with the role Shop Owner Admin or Shop Admin at the shop.
    async fn require_admin<T>(
        &self,
        request: &Request<T>,
        shop_id: &ShopId,
    ) -> Result<EmployeeId, ServiceError> {
        Self::require_caller(request, Caller::Shopctrl)?;
        let employee = acting_employee(request)
            .map_err(|status| ServiceError::PermissionDenied(status.message().to_owned()))?;
        let role = self
            .store()
            .role_of(shop_id.as_str(), employee.as_str())
            .await?;
        match role {
            Role::ShopOwnerAdmin | Role::ShopAdmin => Ok(employee),
            _ => Err(ServiceError::PermissionDenied(format!(
                "employee {employee} needs the role Shop Owner Admin or Shop Admin at shop {shop_id}"
            ))),
        }
    }

    async fn get_settings(
        &self,
        request: Request<GetShopSettingsRequest>,
    ) -> Result<ShopSettings, ServiceError> {
        let shop_id = parse_shop(&request.get_ref().shop_id)?;
        self.require_admin(&request, &shop_id).await?;
        Ok(match self.store().load(shop_id.as_str()).await? {
            Some(config) => settings_to_proto(&config),
            None => settings_to_proto(&ShopConfig {
                settings: SettingsRecord::defaults(shop_id.as_str()),
                secrets: Default::default(),
            }),
        })
    }

    async fn update_settings(
        &self,
        request: Request<UpdateShopSettingsRequest>,
    ) -> Result<ShopSettings, ServiceError> {
        let shop_id = parse_shop(&request.get_ref().shop_id)?;
        let employee = self.require_admin(&request, &shop_id).await?;
        let body = request.into_inner();
        let update = SettingsUpdate {
            workspace_id: body.workspace_id.map(|s| s.trim().to_owned()),
            access_key: body.access_key.map(|s| s.trim().to_owned()),
            signing_key: body.signing_key.map(|s| s.trim().to_owned()),
            assign_on_first_message: body.assign_on_first_message,
            event_webhook_url: body.event_webhook_url.map(|s| s.trim().to_owned()),
            whatsapp_template_name: body.whatsapp_template_name.map(|s| s.trim().to_owned()),
            whatsapp_template_namespace: body
                .whatsapp_template_namespace
                .map(|s| s.trim().to_owned()),
            whatsapp_template_language: body
                .whatsapp_template_language
                .map(|s| s.trim().to_owned()),
            new_conversation_on_closed: body.new_conversation_on_closed,
            conversation_slots: body.conversation_slots,
            legacy_signature_enabled: body.legacy_signature_enabled,
        };
        let violations = update.validate(&self.inner.url_policy);
        if !violations.is_empty() {
            return Err(ServiceError::Invalid(violations.into_vec()));
        }
        let config = self
            .store()
            .update_settings(shop_id.as_str(), body.expected_version, &update)
            .await?;
        tracing::info!(%shop_id, %employee, version = config.settings.version, "settings updated");
        Ok(settings_to_proto(&config))
    }

    async fn rotate(
        &self,
        request: Request<RotateSecretRequest>,
        name: SecretName,
    ) -> Result<RotatedSecret, ServiceError> {
        let shop_id = parse_shop(&request.get_ref().shop_id)?;
        let employee = self.require_admin(&request, &shop_id).await?;
        let (secret, version) = self.store().rotate_secret(shop_id.as_str(), name).await?;
        tracing::info!(%shop_id, %employee, secret = name.as_str(), "secret rotated by admin");
        Ok(RotatedSecret { secret, version })
    }

    async fn upsert_role(
        &self,
        request: Request<UpsertEmployeeRoleRequest>,
    ) -> Result<EmployeeRoleResponse, ServiceError> {
        Self::require_caller(&request, Caller::Shopctrl)?;
        let body = request.into_inner();
        let mut violations = crate::validate::Violations::default();
        let shop_id = ShopId::parse(body.shop_id.clone()).map_err(|e| e.to_string());
        let employee_id = EmployeeId::parse(body.employee_id.clone()).map_err(|e| e.to_string());
        if let Err(e) = &shop_id {
            violations.add("shop_id", e.clone());
        }
        if let Err(e) = &employee_id {
            violations.add("employee_id", e.clone());
        }
        let role = Role::try_from(body.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            violations.add(
                "role",
                "must be ROLE_SHOP_OWNER_ADMIN, ROLE_SHOP_ADMIN or ROLE_SHOP_EMPLOYEE \
                 (withdraw a role with WithdrawEmployeeRole)",
            );
        }
        let display_name = body.display_name.trim();
        if display_name.chars().count() > MAX_DISPLAY_NAME
            || display_name.chars().any(char::is_control)
        {
            violations.add(
                "display_name",
                format!("must be at most {MAX_DISPLAY_NAME} characters without control characters"),
            );
        }
        let (Ok(shop_id), Ok(employee_id), true) = (shop_id, employee_id, violations.is_empty())
        else {
            return Err(ServiceError::Invalid(violations.into_vec()));
        };
        let record = self
            .store()
            .upsert_role(shop_id.as_str(), employee_id.as_str(), role, display_name)
            .await?;
        Ok(role_response(shop_id.as_str(), &record))
    }

    async fn withdraw_role(
        &self,
        request: Request<WithdrawEmployeeRoleRequest>,
    ) -> Result<EmployeeRoleResponse, ServiceError> {
        Self::require_caller(&request, Caller::Shopctrl)?;
        let body = request.get_ref();
        let (shop_id, employee_id) = parse_shop_and_employee(&body.shop_id, &body.employee_id)?;
        let record = self
            .store()
            .withdraw_role(shop_id.as_str(), employee_id.as_str())
            .await?;
        Ok(role_response(shop_id.as_str(), &record))
    }

    async fn list_permissions(
        &self,
        request: Request<ListPermissionsRequest>,
    ) -> Result<ListPermissionsResponse, ServiceError> {
        let shop_id = parse_shop(&request.get_ref().shop_id)?;
        self.require_admin(&request, &shop_id).await?;
        let employees = self.store().employees(shop_id.as_str()).await?;
        Ok(ListPermissionsResponse {
            permissions: employees.iter().map(permission_to_proto).collect(),
        })
    }

    async fn set_chat(
        &self,
        request: Request<SetChatPermissionRequest>,
    ) -> Result<ShopPermission, ServiceError> {
        let body = request.get_ref();
        let (shop_id, employee_id) = parse_shop_and_employee(&body.shop_id, &body.employee_id)?;
        let chat_permission = body.chat_permission;
        let acting = self.require_admin(&request, &shop_id).await?;
        let record = self
            .store()
            .set_chat_permission(shop_id.as_str(), employee_id.as_str(), chat_permission)
            .await?;
        tracing::info!(%shop_id, %employee_id, %acting, chat_permission, "Chat permission set");
        Ok(permission_to_proto(&record))
    }

    async fn internal_shop<T>(
        &self,
        request: &Request<T>,
        allowed: Caller,
        shop_id: &str,
    ) -> Result<ShopConfig, ServiceError> {
        Self::require_caller(request, allowed)?;
        let shop_id = parse_shop(shop_id)?;
        self.store()
            .load(shop_id.as_str())
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("shop {shop_id} has no settings")))
    }

    async fn ingress_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<IngressShop, ServiceError> {
        let config = self
            .internal_shop(&request, Caller::Ingress, &request.get_ref().shop_id)
            .await?;
        Ok(IngressShop {
            shop_id: config.settings.shop_id.clone(),
            enabled: config.enabled(),
            signing_key: config.secret(SecretName::SigningKey).to_owned(),
            handover_secret: config.secret(SecretName::HandoverSecret).to_owned(),
            legacy_signature_enabled: config.settings.legacy_signature_enabled,
            version: config.settings.version,
        })
    }

    async fn delivery_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<DeliveryShop, ServiceError> {
        let config = self
            .internal_shop(&request, Caller::FlowCallback, &request.get_ref().shop_id)
            .await?;
        let s = &config.settings;
        Ok(DeliveryShop {
            shop_id: s.shop_id.clone(),
            enabled: config.enabled(),
            access_key: config.secret(SecretName::AccessKey).to_owned(),
            event_webhook_url: s.event_webhook_url.clone(),
            callback_secret: config.secret(SecretName::CallbackSecret).to_owned(),
            whatsapp_template_name: s.whatsapp_template_name.clone(),
            whatsapp_template_namespace: s.whatsapp_template_namespace.clone(),
            whatsapp_template_language: s.whatsapp_template_language.clone(),
            version: s.version,
        })
    }

    async fn routing_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<RoutingShop, ServiceError> {
        let config = self
            .internal_shop(&request, Caller::Routing, &request.get_ref().shop_id)
            .await?;
        let s = &config.settings;
        let employees = self.store().employees(&s.shop_id).await?;
        Ok(RoutingShop {
            shop_id: s.shop_id.clone(),
            enabled: config.enabled(),
            assign_on_first_message: s.assign_on_first_message,
            new_conversation_on_closed: s.new_conversation_on_closed,
            conversation_slots: s.conversation_slots,
            employees: employees
                .iter()
                .map(|e| RoutingEmployee {
                    employee_id: e.employee_id.clone(),
                    display_name: e.display_name.clone(),
                    role: e.role as i32,
                    chat_permission: e.chat_permission,
                })
                .collect(),
            version: s.version,
        })
    }

    /// A role lookup: answers for any shop config knows (settings or at least one role), so
    /// access checks work before a shop's settings exist; a shop it never heard of is NOT_FOUND.
    async fn employee_access(
        &self,
        request: Request<GetEmployeeAccessRequest>,
    ) -> Result<EmployeeAccess, ServiceError> {
        Self::require_caller(&request, Caller::Routing)?;
        let body = request.get_ref();
        let (shop_id, employee_id) = parse_shop_and_employee(&body.shop_id, &body.employee_id)?;
        if !self.store().shop_known(shop_id.as_str()).await? {
            return Err(ServiceError::NotFound(format!(
                "shop {shop_id} has no settings and no roles"
            )));
        }
        let record = self
            .store()
            .employee(shop_id.as_str(), employee_id.as_str())
            .await?;
        Ok(EmployeeAccess {
            shop_id: shop_id.to_string(),
            employee_id: record.employee_id,
            role: record.role as i32,
            chat_permission: record.chat_permission,
        })
    }
}

fn parse_shop(raw: &str) -> Result<ShopId, ServiceError> {
    ShopId::parse(raw).map_err(|e| ServiceError::invalid("shop_id", e.to_string()))
}

fn parse_shop_and_employee(
    shop_id: &str,
    employee_id: &str,
) -> Result<(ShopId, EmployeeId), ServiceError> {
    let mut violations = crate::validate::Violations::default();
    let shop = ShopId::parse(shop_id);
    let employee = EmployeeId::parse(employee_id);
    if let Err(e) = &shop {
        violations.add("shop_id", e.to_string());
    }
    if let Err(e) = &employee {
        violations.add("employee_id", e.to_string());
    }
    match (shop, employee) {
        (Ok(shop), Ok(employee)) => Ok((shop, employee)),
        _ => Err(ServiceError::Invalid(violations.into_vec())),
    }
}

fn secret_info(config: &ShopConfig, name: SecretName) -> SecretInfo {
    let value = config.secret(name);
    SecretInfo {
        is_set: !value.is_empty(),
        last4: last4(value),
    }
}

fn settings_to_proto(config: &ShopConfig) -> ShopSettings {
    let s = &config.settings;
    ShopSettings {
        shop_id: s.shop_id.clone(),
        enabled: config.enabled(),
        workspace_id: s.workspace_id.clone(),
        access_key: Some(secret_info(config, SecretName::AccessKey)),
        signing_key: Some(secret_info(config, SecretName::SigningKey)),
        assign_on_first_message: s.assign_on_first_message,
        event_webhook_url: s.event_webhook_url.clone(),
        whatsapp_template_name: s.whatsapp_template_name.clone(),
        whatsapp_template_namespace: s.whatsapp_template_namespace.clone(),
        whatsapp_template_language: s.whatsapp_template_language.clone(),
        new_conversation_on_closed: s.new_conversation_on_closed,
        conversation_slots: s.conversation_slots,
        handover_secret: Some(secret_info(config, SecretName::HandoverSecret)),
        callback_secret: Some(secret_info(config, SecretName::CallbackSecret)),
        legacy_signature_enabled: s.legacy_signature_enabled,
        version: s.version,
        updated_at: s.updated_at.map(|t| prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
        }),
    }
}

fn role_response(shop_id: &str, record: &EmployeeRecord) -> EmployeeRoleResponse {
    EmployeeRoleResponse {
        shop_id: shop_id.to_owned(),
        employee_id: record.employee_id.clone(),
        role: record.role as i32,
        chat_permission: record.chat_permission,
    }
}

fn permission_to_proto(record: &EmployeeRecord) -> ShopPermission {
    ShopPermission {
        employee_id: record.employee_id.clone(),
        display_name: record.display_name.clone(),
        role: record.role as i32,
        chat_permission: record.chat_permission,
    }
}

#[tonic::async_trait]
impl ConfigService for Handlers {
    async fn get_shop_settings(
        &self,
        request: Request<GetShopSettingsRequest>,
    ) -> Result<Response<ShopSettings>, Status> {
        let result = self.get_settings(request).await;
        self.finish("GetShopSettings", result)
    }

    async fn update_shop_settings(
        &self,
        request: Request<UpdateShopSettingsRequest>,
    ) -> Result<Response<ShopSettings>, Status> {
        let result = self.update_settings(request).await;
        self.finish("UpdateShopSettings", result)
    }

    async fn rotate_handover_secret(
        &self,
        request: Request<RotateSecretRequest>,
    ) -> Result<Response<RotatedSecret>, Status> {
        let result = self.rotate(request, SecretName::HandoverSecret).await;
        self.finish("RotateHandoverSecret", result)
    }

    async fn rotate_callback_secret(
        &self,
        request: Request<RotateSecretRequest>,
    ) -> Result<Response<RotatedSecret>, Status> {
        let result = self.rotate(request, SecretName::CallbackSecret).await;
        self.finish("RotateCallbackSecret", result)
    }

    async fn upsert_employee_role(
        &self,
        request: Request<UpsertEmployeeRoleRequest>,
    ) -> Result<Response<EmployeeRoleResponse>, Status> {
        let result = self.upsert_role(request).await;
        self.finish("UpsertEmployeeRole", result)
    }

    async fn withdraw_employee_role(
        &self,
        request: Request<WithdrawEmployeeRoleRequest>,
    ) -> Result<Response<EmployeeRoleResponse>, Status> {
        let result = self.withdraw_role(request).await;
        self.finish("WithdrawEmployeeRole", result)
    }

    async fn list_permissions(
        &self,
        request: Request<ListPermissionsRequest>,
    ) -> Result<Response<ListPermissionsResponse>, Status> {
        let result = Handlers::list_permissions(self, request).await;
        self.finish("ListPermissions", result)
    }

    async fn set_chat_permission(
        &self,
        request: Request<SetChatPermissionRequest>,
    ) -> Result<Response<ShopPermission>, Status> {
        let result = self.set_chat(request).await;
        self.finish("SetChatPermission", result)
    }
}

#[tonic::async_trait]
impl ConfigInternalService for Handlers {
    async fn get_ingress_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<Response<IngressShop>, Status> {
        let result = self.ingress_shop(request).await;
        self.finish("GetIngressShop", result)
    }

    async fn get_delivery_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<Response<DeliveryShop>, Status> {
        let result = self.delivery_shop(request).await;
        self.finish("GetDeliveryShop", result)
    }

    async fn get_routing_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<Response<RoutingShop>, Status> {
        let result = self.routing_shop(request).await;
        self.finish("GetRoutingShop", result)
    }

    async fn get_employee_access(
        &self,
        request: Request<GetEmployeeAccessRequest>,
    ) -> Result<Response<EmployeeAccess>, Status> {
        let result = self.employee_access(request).await;
        self.finish("GetEmployeeAccess", result)
    }
}
