//! ConfigChanged events: published to the fan-out exchange through the outbox after the
//! change committed, and never for a refused change.

use std::time::Duration;

use shopctrl_proto::v1::{
    GetShopSettingsRequest, Role, RotateSecretRequest, SetChatPermissionRequest,
    UpdateShopSettingsRequest, config_changed::Change,
};
use tonic::Code;

use shopctrl_testkit::TcpProxy;

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

/// The outbox at work: a change made while RabbitMQ is unreachable commits, and its event is
/// published once the broker is back. Readiness reports the outage meanwhile.
#[tokio::test]
async fn changes_made_while_the_broker_is_down_are_published_when_it_returns() -> TestResult {
    let broker = url::Url::parse(&shopctrl_testkit::amqp_url())?;
    let target = format!(
        "{}:{}",
        broker.host_str().unwrap_or("127.0.0.1"),
        broker.port().unwrap_or(5672)
    );
    let proxy = TcpProxy::start(&target).await;
    let mut through_proxy = broker.clone();
    through_proxy.set_host(Some("127.0.0.1"))?;
    let _ = through_proxy.set_port(Some(proxy.addr().port()));
    let service = TestService::start_with(|s| {
        s.amqp_url = shopctrl_config::Redacted::new(through_proxy.as_str());
    })
    .await;
    let mut tap = service.tap().await;
    service
        .grant_role(SHOP, OWNER, shopctrl_proto::v1::Role::ShopOwnerAdmin)
        .await;
    tap.next().await;
    // The relay deletes a row only after the broker's confirm, which may trail the delivery.
    let mut conn = service.db.connection().await;
    for _ in 0..100 {
        let pending: i64 = sqlx::query_scalar("select count(*) from config.outbox")
            .fetch_one(&mut conn)
            .await?;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.cut();
    let updated = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 0,
            conversation_slots: Some(2),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(
        updated.version, 1,
        "the change commits while the broker is away"
    );
    let mut not_ready = false;
    for _ in 0..40 {
        if service.ops_get("/readyz").await.0 == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(not_ready, "readiness must report the broker outage");
    let pending: i64 = sqlx::query_scalar("select count(*) from config.outbox")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(pending, 1, "the event waits in the outbox");
    tap.assert_quiet(Duration::from_millis(500)).await;

    proxy.restore();
    let (event, _, _) = tap.next().await;
    assert_eq!(event.version, 1);
    assert!(matches!(event.change, Some(Change::Settings(ref s)) if s.conversation_slots == 2));
    let mut ready = false;
    for _ in 0..40 {
        if service.ops_get("/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ready, "readiness recovers with the broker");
    Ok(())
}
