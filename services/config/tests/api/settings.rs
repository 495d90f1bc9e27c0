//! Every setting round-trips; every validation rule refuses its bad value, names the field and
//! changes nothing; optimistic concurrency refuses stale versions.

use shopctrl_proto::v1::{GetShopSettingsRequest, Role, ShopSettings, UpdateShopSettingsRequest};
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::support::{OWNER, SHOP, TestResult, TestService, as_owner};

const WORKSPACE: &str = "2d7f8a3e-5c1b-4a9e-8f00-1a2b3c4d5e6f";
const ACCESS_KEY: &str = "live_Abcdefghijklmnopqrstu1234";
const SIGNING_KEY: &str = "signing-key-0123456789abcdef5678";

async fn get(service: &TestService) -> ShopSettings {
    service
        .admin()
        .get_shop_settings(as_owner(GetShopSettingsRequest {
            shop_id: SHOP.into(),
        }))
        .await
        .expect("get settings")
        .into_inner()
}

fn full_update(expected_version: u64) -> UpdateShopSettingsRequest {
    UpdateShopSettingsRequest {
        shop_id: SHOP.into(),
        expected_version,
        workspace_id: Some(WORKSPACE.into()),
        access_key: Some(ACCESS_KEY.into()),
        signing_key: Some(SIGNING_KEY.into()),
        assign_on_first_message: Some(false),
        event_webhook_url: Some("https://flows.example.com/hooks/availability".into()),
        whatsapp_template_name: Some("agent_reply".into()),
        whatsapp_template_namespace: Some("cdb2df51_9816_c754_c5a4_64cdabdcad3e".into()),
        whatsapp_template_language: Some("nl_NL".into()),
        new_conversation_on_closed: Some(true),
        conversation_slots: Some(7),
        legacy_signature_enabled: Some(true),
    }
}

async fn service_with_owner() -> TestService {
    let service = TestService::start().await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    service
}

#[tokio::test]
async fn every_setting_round_trips() -> TestResult {
    let service = service_with_owner().await;

    let defaults = get(&service).await;
    assert_eq!(defaults.version, 0);
    assert!(!defaults.enabled);
    assert_eq!(defaults.whatsapp_template_language, "en");
    assert_eq!(defaults.conversation_slots, 5);
    assert!(defaults.assign_on_first_message);
    assert!(!defaults.new_conversation_on_closed);
    assert!(!defaults.legacy_signature_enabled);
    assert!(!defaults.access_key.clone().unwrap_or_default().is_set);

    let created = service
        .admin()
        .update_shop_settings(as_owner(full_update(0)))
        .await?
        .into_inner();
    assert_eq!(created.version, 1);
    let read = get(&service).await;
    assert_eq!(read, created);
    assert!(read.enabled);
    assert_eq!(read.workspace_id, WORKSPACE);
    assert!(!read.assign_on_first_message);
    assert_eq!(
        read.event_webhook_url,
        "https://flows.example.com/hooks/availability"
    );
    assert_eq!(read.whatsapp_template_name, "agent_reply");
    assert_eq!(
        read.whatsapp_template_namespace,
        "cdb2df51_9816_c754_c5a4_64cdabdcad3e"
    );
    assert_eq!(read.whatsapp_template_language, "nl_NL");
    assert!(read.new_conversation_on_closed);
    assert_eq!(read.conversation_slots, 7);
    assert!(read.legacy_signature_enabled);
    let access = read.access_key.clone().unwrap_or_default();
    assert!(access.is_set);
    assert_eq!(access.last4, "1234");
    let signing = read.signing_key.clone().unwrap_or_default();
    assert!(signing.is_set);
    assert_eq!(signing.last4, "5678");
    assert!(read.updated_at.is_some());

    // Each field changes on its own and the others stay.
    let second = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 1,
            assign_on_first_message: Some(true),
            new_conversation_on_closed: Some(false),
            legacy_signature_enabled: Some(false),
            conversation_slots: Some(0),
            event_webhook_url: Some(String::new()),
            whatsapp_template_language: Some("en_US".into()),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(second.version, 2);
    let read = get(&service).await;
    assert_eq!(read, second);
    assert!(read.assign_on_first_message);
    assert!(!read.new_conversation_on_closed);
    assert!(!read.legacy_signature_enabled);
    assert_eq!(read.conversation_slots, 0);
    assert_eq!(read.event_webhook_url, "");
    assert_eq!(read.whatsapp_template_language, "en_US");
    assert_eq!(read.workspace_id, WORKSPACE);
    assert_eq!(read.whatsapp_template_name, "agent_reply");

    // Clearing the access key disables messaging; the maximum slot count is accepted.
    let third = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 2,
            access_key: Some(String::new()),
            conversation_slots: Some(1000),
            whatsapp_template_name: Some(String::new()),
            whatsapp_template_namespace: Some(String::new()),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(third.version, 3);
    assert!(!third.enabled);
    assert!(!third.access_key.clone().unwrap_or_default().is_set);
    assert_eq!(third.conversation_slots, 1000);
    assert_eq!(third.whatsapp_template_name, "");
    assert_eq!(get(&service).await, third);

    // Sending values equal to the stored ones is not a change: no new version.
    let same = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 3,
            conversation_slots: Some(1000),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(same.version, 3);
    Ok(())
}

/// One bad value per case, the field the error must name.
fn bad_cases() -> Vec<(&'static str, UpdateShopSettingsRequest, &'static str)> {
    let base = || UpdateShopSettingsRequest {
        shop_id: SHOP.into(),
        expected_version: 1,
        ..Default::default()
    };
    let url = |u: &str| UpdateShopSettingsRequest {
        event_webhook_url: Some(u.into()),
        ..base()
    };
    vec![
        (
            "workspace id format",
            UpdateShopSettingsRequest {
                workspace_id: Some("bad workspace/id".into()),
                ..base()
            },
            "workspace_id",
        ),
        (
            "test access key",
            UpdateShopSettingsRequest {
                access_key: Some("test_gshuPaZoeEG6ovbc8M79w0QyM".into()),
                ..base()
            },
            "access_key",
        ),
        (
            "malformed access key",
            UpdateShopSettingsRequest {
                access_key: Some("short".into()),
                ..base()
            },
            "access_key",
        ),
        (
            "malformed signing key",
            UpdateShopSettingsRequest {
                signing_key: Some("has spaces in the signing key".into()),
                ..base()
            },
            "signing_key",
        ),
        (
            "http url",
            url("http://flows.example.com/hook"),
            "event_webhook_url",
        ),
        (
            "other scheme",
            url("ftp://flows.example.com/hook"),
            "event_webhook_url",
        ),
        ("not a url", url("flows example"), "event_webhook_url"),
        (
            "private ip",
            url("https://10.0.0.5/hook"),
            "event_webhook_url",
        ),
        (
            "private ip 192.168",
            url("https://192.168.1.20/hook"),
            "event_webhook_url",
        ),
        (
            "loopback",
            url("https://127.0.0.1/hook"),
            "event_webhook_url",
        ),
        (
            "loopback decimal",
            url("https://2130706433/hook"),
            "event_webhook_url",
        ),
        (
            "loopback v6",
            url("https://[::1]/hook"),
            "event_webhook_url",
        ),
        (
            "link-local metadata",
            url("https://169.254.169.254/latest/meta-data"),
            "event_webhook_url",
        ),
        (
            "link-local v6",
            url("https://[fe80::1]/hook"),
            "event_webhook_url",
        ),
        (
            "mapped private v6",
            url("https://[::ffff:10.0.0.1]/hook"),
            "event_webhook_url",
        ),
        (
            "localhost",
            url("https://localhost/hook"),
            "event_webhook_url",
        ),
        (
            "credentials",
            url("https://user:pass@flows.example.com/hook"),
            "event_webhook_url",
        ),
        (
            "slots above maximum",
            UpdateShopSettingsRequest {
                conversation_slots: Some(1001),
                ..base()
            },
            "conversation_slots",
        ),
        (
            "template name format",
            UpdateShopSettingsRequest {
                whatsapp_template_name: Some("Agent Reply".into()),
                ..base()
            },
            "whatsapp_template_name",
        ),
        (
            "template namespace format",
            UpdateShopSettingsRequest {
                whatsapp_template_namespace: Some("bad/namespace".into()),
                ..base()
            },
            "whatsapp_template_namespace",
        ),
        (
            "template language format",
            UpdateShopSettingsRequest {
                whatsapp_template_language: Some("english".into()),
                ..base()
            },
            "whatsapp_template_language",
        ),
        (
            "template name without namespace",
            UpdateShopSettingsRequest {
                whatsapp_template_namespace: Some(String::new()),
                ..base()
            },
            "whatsapp_template_namespace",
        ),
        (
            "shop id format",
            UpdateShopSettingsRequest {
                shop_id: "shop 1".into(),
                conversation_slots: Some(3),
                ..base()
            },
            "shop_id",
        ),
    ]
}

#[tokio::test]
async fn every_validation_rule_names_its_field_and_changes_nothing() -> TestResult {
    let service = service_with_owner().await;
    service
        .admin()
        .update_shop_settings(as_owner(full_update(0)))
        .await?;
    let before = get(&service).await;
    assert_eq!(before.version, 1);

    for (case, request, field) in bad_cases() {
        let status = service
            .admin()
            .update_shop_settings(as_owner(request))
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        let bad_request = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{case}: no BadRequest detail in {status:?}"));
        let fields: Vec<&str> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, vec![field], "{case}");
        assert!(
            !bad_request.field_violations[0].description.is_empty(),
            "{case}"
        );
        assert!(
            status.message().contains(field),
            "{case}: {}",
            status.message()
        );
        assert_eq!(get(&service).await, before, "{case} changed something");
    }
    Ok(())
}

#[tokio::test]
async fn all_violations_are_reported_at_once_and_nothing_is_applied() -> TestResult {
    let service = service_with_owner().await;
    service
        .admin()
        .update_shop_settings(as_owner(full_update(0)))
        .await?;
    let before = get(&service).await;
    let status = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 1,
            workspace_id: Some("no pe!".into()),
            access_key: Some("test_abcdefghijklmnopqrstuvw".into()),
            event_webhook_url: Some("http://127.0.0.1/hook".into()),
            conversation_slots: Some(5000),
            // Valid on its own: must not be applied either.
            assign_on_first_message: Some(true),
            ..Default::default()
        }))
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields: Vec<String> = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "access_key",
            "conversation_slots",
            "event_webhook_url",
            "workspace_id"
        ]
    );
    assert_eq!(get(&service).await, before);
    Ok(())
}

#[tokio::test]
async fn http_and_local_urls_only_with_the_development_settings() -> TestResult {
    let service = TestService::start_with(|s| {
        s.allow_http_webhook_urls = true;
        s.ssrf_allow_cidrs = "127.0.0.0/8".into();
    })
    .await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    let mut request = full_update(0);
    request.event_webhook_url = Some("http://flows.example.com/hook".into());
    let created = service
        .admin()
        .update_shop_settings(as_owner(request))
        .await?
        .into_inner();
    assert_eq!(created.event_webhook_url, "http://flows.example.com/hook");
    // The allow-list opens loopback for a local stack, nothing else.
    let local = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 1,
            event_webhook_url: Some("http://127.0.0.1:8081/hook".into()),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(local.version, 2);
    // Still never another private address.
    let status = service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 2,
            event_webhook_url: Some("http://192.168.0.10/hook".into()),
            ..Default::default()
        }))
        .await
        .expect_err("private");
    assert_eq!(status.code(), Code::InvalidArgument);
    Ok(())
}

#[tokio::test]
async fn stale_versions_are_refused() -> TestResult {
    let service = service_with_owner().await;
    service
        .admin()
        .update_shop_settings(as_owner(full_update(0)))
        .await?;

    // Two admins creating the same shop's settings at once: one wins, the other is told.
    service
        .grant_role("shop-race", OWNER, Role::ShopOwnerAdmin)
        .await;
    let create = |slots: u32| UpdateShopSettingsRequest {
        shop_id: "shop-race".into(),
        expected_version: 0,
        conversation_slots: Some(slots),
        ..Default::default()
    };
    let (mut first, mut second) = (service.admin(), service.admin());
    let (a, b) = tokio::join!(
        first.update_shop_settings(as_owner(create(1))),
        second.update_shop_settings(as_owner(create(2))),
    );
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1);
    assert_eq!(
        a.err().or(b.err()).expect("a loser").code(),
        Code::FailedPrecondition
    );

    // Creating twice.
    let status = service
        .admin()
        .update_shop_settings(as_owner(full_update(0)))
        .await
        .expect_err("exists");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("already has settings"),
        "{}",
        status.message()
    );

    let bump = |expected: u64, slots: u32| UpdateShopSettingsRequest {
        shop_id: SHOP.into(),
        expected_version: expected,
        conversation_slots: Some(slots),
        ..Default::default()
    };
    service
        .admin()
        .update_shop_settings(as_owner(bump(1, 2)))
        .await?;
    let before = get(&service).await;
    assert_eq!(before.version, 2);
    let status = service
        .admin()
        .update_shop_settings(as_owner(bump(1, 9)))
        .await
        .expect_err("stale");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("expected version 1, current version 2"),
        "{}",
        status.message()
    );
    let precondition = status
        .get_details_precondition_failure()
        .expect("PreconditionFailure detail");
    assert_eq!(precondition.violations[0].r#type, "VERSION");
    assert_eq!(get(&service).await, before);

    // Two admins saving the same version at once: exactly one wins.
    let (mut first, mut second) = (service.admin(), service.admin());
    let (a, b) = tokio::join!(
        first.update_shop_settings(as_owner(bump(2, 11))),
        second.update_shop_settings(as_owner(bump(2, 12))),
    );
    let winners = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count();
    assert_eq!(winners, 1, "{a:?} {b:?}");
    let loser = a.err().or(b.err()).expect("one loser");
    assert_eq!(loser.code(), Code::FailedPrecondition);
    assert_eq!(get(&service).await.version, 3);
    Ok(())
}
