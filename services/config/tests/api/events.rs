//! ConfigChanged events: published to the fan-out exchange through the outbox after the
//! change committed, and never for a refused change.

use std::time::Duration;

use shopctrl_proto::v1::{
    GetShopSettingsRequest, Role, RotateSecretRequest, SetChatPermissionRequest,
    UpdateShopSettingsRequest, config_changed::Change,
};
use tonic::Code;

use crate::support::{OWNER, SHOP, SHOPCTRL, TestResult, TestService, as_owner, call};

#[tokio::test]
async fn changes_are_announced_after_commit_and_refusals_are_not() -> TestResult {
    let service = TestService::start().await;
    let mut tap = service.tap().await;

    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    let (event, kind, message_id) = tap.next().await;
    assert_eq!(kind, "shopctrl.messaging.v1.ConfigChanged");
    let meta = event.meta.clone().unwrap_or_default();
    assert_eq!(meta.event_id, message_id);
    assert_eq!(meta.producer, "config");
    assert!(meta.occurred_at.is_some());
    assert!(matches!(event.change, Some(Change::Role(ref r)) if r.role() == Role::ShopOwnerAdmin));

    let created = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 0,
            conversation_slots: Some(4),
            assign_on_first_message: Some(false),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let (event, _, _) = tap.next().await;
    assert_eq!(event.shop_id, SHOP);
    assert_eq!(event.version, created.version);
    match &event.change {
        Some(Change::Settings(settings)) => {
            assert_eq!(
                settings.fields,
                ["assign_on_first_message", "conversation_slots"]
            );
            assert_eq!(settings.conversation_slots, 4);
            assert!(!settings.assign_on_first_message);
            assert!(!settings.enabled);
        }
        other => panic!("expected a settings change, got {other:?}"),
    }
    // Published after commit: the change is visible when the event arrives.
    let now = service
        .admin()
        .get_shop_settings(as_owner(GetShopSettingsRequest {
            shop_id: SHOP.into(),
        }))
        .await?
        .into_inner();
    assert!(now.version >= event.version);

    // Refused changes: invalid, stale, unauthorized, chat without a role.
    let invalid = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 1,
            conversation_slots: Some(4000),
            ..Default::default()
        }))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let stale = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 7,
            conversation_slots: Some(9),
            ..Default::default()
        }))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let unauthorized = service
        .admin()
        .rotate_callback_secret(call(
            RotateSecretRequest {
                shop_id: SHOP.into(),
            },
            SHOPCTRL,
            Some("emp-nobody"),
        ))
        .await
        .expect_err("unauthorized");
    assert_eq!(unauthorized.code(), Code::PermissionDenied);
    let no_role = service
        .admin()
        .set_chat_permission(as_owner(SetChatPermissionRequest {
            shop_id: SHOP.into(),
            employee_id: "emp-nobody".into(),
            chat_permission: true,
        }))
        .await
        .expect_err("no role");
    assert_eq!(no_role.code(), Code::FailedPrecondition);
    // An update that changes nothing is not announced either.
    service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 1,
            conversation_slots: Some(4),
            ..Default::default()
        }))
        .await?;

    // The next event is the next accepted change, not any of the refused ones.
    service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 1,
            conversation_slots: Some(6),
            ..Default::default()
        }))
        .await?;
    let (event, _, _) = tap.next().await;
    assert_eq!(event.version, 2);
    match &event.change {
        Some(Change::Settings(settings)) => {
            assert_eq!(settings.fields, ["conversation_slots"]);
            assert_eq!(settings.conversation_slots, 6);
        }
        other => panic!("expected a settings change, got {other:?}"),
    }

    service
        .admin()
        .rotate_handover_secret(as_owner(RotateSecretRequest {
            shop_id: SHOP.into(),
        }))
        .await?;
    let (event, _, _) = tap.next().await;
    assert_eq!(event.version, 3);
    assert!(matches!(event.change, Some(Change::Secret(ref s)) if s.secret == "handover_secret"));

    tap.assert_quiet(Duration::from_millis(700)).await;
    let mut conn = service.db.connection().await;
    let pending: i64 = sqlx::query_scalar("select count(*) from config.outbox")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(pending, 0, "the relay deletes what it published");
    Ok(())
}
