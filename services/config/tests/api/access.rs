//! Roles, Chat permissions, authentication and authorization.

use shopctrl_proto::v1::{
    ConfigChanged, GetEmployeeAccessRequest, GetInternalShopRequest, GetShopSettingsRequest,
    ListPermissionsRequest, Role, RotateSecretRequest, SetChatPermissionRequest,
    UpdateShopSettingsRequest, UpsertEmployeeRoleRequest, WithdrawEmployeeRoleRequest,
    config_changed::Change,
};
use tonic::{Code, Request};
use tonic_types::StatusExt as _;

use crate::support::{
    FLOW_CALLBACK, INGRESS, OWNER, ROUTING, SHOP, SHOPCTRL, TestResult, TestService, as_owner, call,
};

fn set_chat(employee: &str, chat: bool) -> SetChatPermissionRequest {
    SetChatPermissionRequest {
        shop_id: SHOP.into(),
        employee_id: employee.into(),
        chat_permission: chat,
    }
}

async fn permissions(service: &TestService) -> Vec<(String, Role, bool)> {
    service
        .admin()
        .list_permissions(as_owner(ListPermissionsRequest {
            shop_id: SHOP.into(),
        }))
        .await
        .expect("list permissions")
        .into_inner()
        .permissions
        .into_iter()
        .map(|p| (p.role(), p.chat_permission, p.employee_id))
        .map(|(role, chat, id)| (id, role, chat))
        .collect()
}

async fn create_settings(service: &TestService) {
    service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 0,
            conversation_slots: Some(3),
            ..Default::default()
        }))
        .await
        .expect("create settings");
}

#[tokio::test]
async fn chat_permission_only_for_employees_with_a_role() -> TestResult {
    let service = TestService::start().await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    service.grant_role(SHOP, "emp-a", Role::ShopEmployee).await;
    // A role at another shop does not count.
    service.grant_role("shop-2", "emp-x", Role::ShopAdmin).await;

    let status = service
        .admin()
        .set_chat_permission(as_owner(set_chat("emp-x", true)))
        .await
        .expect_err("no role at the shop");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("no role at shop"),
        "{}",
        status.message()
    );
    assert_eq!(
        status
            .get_details_precondition_failure()
            .expect("detail")
            .violations[0]
            .r#type,
        "ROLE"
    );

    let granted = service
        .admin()
        .set_chat_permission(as_owner(set_chat("emp-a", true)))
        .await?
        .into_inner();
    assert!(granted.chat_permission);
    assert_eq!(granted.role(), Role::ShopEmployee);
    assert_eq!(
        permissions(&service).await,
        vec![
            ("emp-a".to_owned(), Role::ShopEmployee, true),
            (OWNER.to_owned(), Role::ShopOwnerAdmin, false),
        ]
    );
    // Granting twice is harmless; removing works.
    service
        .admin()
        .set_chat_permission(as_owner(set_chat("emp-a", true)))
        .await?;
    service
        .admin()
        .set_chat_permission(as_owner(set_chat("emp-a", false)))
        .await?;
    assert_eq!(
        permissions(&service).await[0],
        ("emp-a".to_owned(), Role::ShopEmployee, false)
    );

    // The database itself refuses a permission without a role.
    let mut conn = service.db.connection().await;
    let refused = sqlx::query(
        "insert into config.chat_permission (shop_id, employee_id) values ($1, 'emp-x')",
    )
    .bind(SHOP)
    .execute(&mut conn)
    .await;
    assert!(refused.is_err());
    Ok(())
}

#[tokio::test]
async fn withdrawing_a_role_removes_the_permission_atomically_and_announces_it() -> TestResult {
    let service = TestService::start().await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    create_settings(&service).await;
    service.grant_role(SHOP, "emp-a", Role::ShopEmployee).await;
    service
        .admin()
        .set_chat_permission(as_owner(set_chat("emp-a", true)))
        .await?;
    let mut tap = service.tap().await;

    let withdrawn = service
        .admin()
        .withdraw_employee_role(call(
            WithdrawEmployeeRoleRequest {
                shop_id: SHOP.into(),
                employee_id: "emp-a".into(),
            },
            SHOPCTRL,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(withdrawn.role(), Role::Unspecified);
    assert!(!withdrawn.chat_permission);

    let mut conn = service.db.connection().await;
    let (roles, chats): (i64, i64) = sqlx::query_as(
        "select (select count(*) from config.employee_role where employee_id = 'emp-a'),
                (select count(*) from config.chat_permission where employee_id = 'emp-a')",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!((roles, chats), (0, 0));
    assert_eq!(
        permissions(&service).await,
        vec![(OWNER.to_owned(), Role::ShopOwnerAdmin, false)]
    );
    let access = service
        .internal()
        .get_employee_access(call(
            GetEmployeeAccessRequest {
                shop_id: SHOP.into(),
                employee_id: "emp-a".into(),
            },
            ROUTING,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(access.role(), Role::Unspecified);
    assert!(!access.chat_permission);

    // The grant and permission events of the setup may still be on their way (the outbox
    // relay publishes after commit, possibly after the tap was bound): wait for the withdrawal.
    let event = tap
        .next_where(|e: &ConfigChanged| {
            matches!(&e.change, Some(Change::Role(r))
                if r.employee_id == "emp-a" && r.role() == Role::Unspecified)
        })
        .await;
    assert_eq!(event.shop_id, SHOP);
    assert_eq!(event.version, 1);
    match event.change {
        Some(Change::Role(role)) => {
            assert_eq!(role.employee_id, "emp-a");
            assert_eq!(role.role(), Role::Unspecified);
            assert!(!role.chat_permission);
        }
        other => panic!("expected a role change, got {other:?}"),
    }

    // The database refuses deleting a role whose permission remains: withdrawal can only
    // happen the way the service does it, permission first, in one transaction.
    service.grant_role(SHOP, "emp-b", Role::ShopEmployee).await;
    service
        .admin()
        .set_chat_permission(as_owner(set_chat("emp-b", true)))
        .await?;
    let refused = sqlx::query(
        "delete from config.employee_role where shop_id = $1 and employee_id = 'emp-b'",
    )
    .bind(SHOP)
    .execute(&mut conn)
    .await;
    assert!(refused.is_err());

    // Withdrawal racing with grants never leaves a permission without a role.
    for round in 0..10 {
        let employee = format!("emp-race-{round}");
        service
            .grant_role(SHOP, &employee, Role::ShopEmployee)
            .await;
        let mut admin = service.admin();
        let mut admin2 = service.admin();
        let (_, grant) = tokio::join!(
            admin.withdraw_employee_role(call(
                WithdrawEmployeeRoleRequest {
                    shop_id: SHOP.into(),
                    employee_id: employee.clone(),
                },
                SHOPCTRL,
                None,
            )),
            admin2.set_chat_permission(as_owner(set_chat(&employee, true))),
        );
        if let Err(status) = grant {
            assert_eq!(status.code(), Code::FailedPrecondition);
        }
    }
    let orphans: i64 = sqlx::query_scalar(
        "select count(*) from config.chat_permission c where not exists (
            select 1 from config.employee_role r
            where r.shop_id = c.shop_id and r.employee_id = c.employee_id)",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(orphans, 0);
    Ok(())
}

#[tokio::test]
async fn unauthenticated_calls_are_refused() -> TestResult {
    let service = TestService::start().await;
    let get = || GetShopSettingsRequest {
        shop_id: SHOP.into(),
    };
    let mut no_token = Request::new(get());
    no_token
        .metadata_mut()
        .insert("x-shopctrl-employee-id", OWNER.parse()?);
    let mut basic = Request::new(get());
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {SHOPCTRL}").parse()?);
    for request in [
        no_token,
        call(get(), "wrong-token-wrong-token", Some(OWNER)),
        call(get(), "", Some(OWNER)),
        basic,
    ] {
        let status = service
            .admin()
            .get_shop_settings(request)
            .await
            .expect_err("unauthenticated");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let status = service
        .internal()
        .get_ingress_shop(call(
            GetInternalShopRequest {
                shop_id: SHOP.into(),
            },
            "dev-ingress-token",
            None,
        ))
        .await
        .expect_err("dev tokens are off when AUTH_TOKENS is set");
    assert_eq!(status.code(), Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn admin_calls_need_an_admin_role_at_that_shop() -> TestResult {
    let service = TestService::start().await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    service
        .grant_role(SHOP, "emp-plain", Role::ShopEmployee)
        .await;
    service.grant_role(SHOP, "emp-admin", Role::ShopAdmin).await;
    service
        .grant_role("shop-2", "emp-elsewhere", Role::ShopOwnerAdmin)
        .await;
    create_settings(&service).await;

    let denied = |code: Code| assert_eq!(code, Code::PermissionDenied);
    for employee in [
        Some("emp-plain"),
        Some("emp-elsewhere"),
        Some("emp-nobody"),
        None,
    ] {
        let mut admin = service.admin();
        let who = |m| call(m, SHOPCTRL, employee);
        denied(
            admin
                .get_shop_settings(who(GetShopSettingsRequest {
                    shop_id: SHOP.into(),
                }))
                .await
                .expect_err("get")
                .code(),
        );
        let status = admin
            .update_shop_settings(call(
                UpdateShopSettingsRequest {
                    shop_id: SHOP.into(),
                    expected_version: 1,
                    // Invalid too: authorization is checked before validation.
                    conversation_slots: Some(5000),
                    ..Default::default()
                },
                SHOPCTRL,
                employee,
            ))
            .await
            .expect_err("update");
        denied(status.code());
        denied(
            admin
                .list_permissions(call(
                    ListPermissionsRequest {
                        shop_id: SHOP.into(),
                    },
                    SHOPCTRL,
                    employee,
                ))
                .await
                .expect_err("list")
                .code(),
        );
        denied(
            admin
                .set_chat_permission(call(set_chat("emp-plain", true), SHOPCTRL, employee))
                .await
                .expect_err("chat")
                .code(),
        );
        denied(
            admin
                .rotate_handover_secret(call(
                    RotateSecretRequest {
                        shop_id: SHOP.into(),
                    },
                    SHOPCTRL,
                    employee,
                ))
                .await
                .expect_err("rotate")
                .code(),
        );
    }
    // Shop Admin may, like the Shop Owner Admin.
    service
        .admin()
        .set_chat_permission(call(
            set_chat("emp-plain", true),
            SHOPCTRL,
            Some("emp-admin"),
        ))
        .await?;
    assert_eq!(permissions(&service).await.len(), 3);

    // Internal service tokens cannot use the admin API, not even with an admin employee.
    for token in [INGRESS, ROUTING, FLOW_CALLBACK] {
        let status = service
            .admin()
            .get_shop_settings(call(
                GetShopSettingsRequest {
                    shop_id: SHOP.into(),
                },
                token,
                Some(OWNER),
            ))
            .await
            .expect_err("internal token on the admin API");
        denied(status.code());
        let status = service
            .admin()
            .upsert_employee_role(call(
                UpsertEmployeeRoleRequest {
                    shop_id: SHOP.into(),
                    employee_id: "emp-new".into(),
                    role: Role::ShopOwnerAdmin as i32,
                    display_name: String::new(),
                },
                token,
                None,
            ))
            .await
            .expect_err("internal token reporting roles");
        denied(status.code());
    }
    let status = service
        .admin()
        .upsert_employee_role(call(
            UpsertEmployeeRoleRequest {
                shop_id: SHOP.into(),
                employee_id: "emp-new".into(),
                role: Role::Unspecified as i32,
                display_name: String::new(),
            },
            SHOPCTRL,
            None,
        ))
        .await
        .expect_err("role required");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status
            .get_details_bad_request()
            .expect("detail")
            .field_violations[0]
            .field,
        "role"
    );
    Ok(())
}

#[tokio::test]
async fn internal_calls_are_scoped_by_service_token() -> TestResult {
    let service = TestService::start().await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    create_settings(&service).await;
    let shop = || GetInternalShopRequest {
        shop_id: SHOP.into(),
    };
    let access = || GetEmployeeAccessRequest {
        shop_id: SHOP.into(),
        employee_id: OWNER.into(),
    };
    let mut client = service.internal();

    // Each caller reaches its own method...
    client.get_ingress_shop(call(shop(), INGRESS, None)).await?;
    client
        .get_delivery_shop(call(shop(), FLOW_CALLBACK, None))
        .await?;
    let routing = client
        .get_routing_shop(call(shop(), ROUTING, None))
        .await?
        .into_inner();
    assert_eq!(routing.conversation_slots, 3);
    assert_eq!(routing.employees.len(), 1);
    let owner = client
        .get_employee_access(call(access(), ROUTING, None))
        .await?
        .into_inner();
    assert_eq!(owner.role(), Role::ShopOwnerAdmin);

    // ...and nothing else.
    for token in [SHOPCTRL, ROUTING, FLOW_CALLBACK] {
        let status = client
            .get_ingress_shop(call(shop(), token, Some(OWNER)))
            .await
            .expect_err("ingress only");
        assert_eq!(status.code(), Code::PermissionDenied, "{token}");
    }
    for token in [SHOPCTRL, ROUTING, INGRESS] {
        let status = client
            .get_delivery_shop(call(shop(), token, Some(OWNER)))
            .await
            .expect_err("flow-callback only");
        assert_eq!(status.code(), Code::PermissionDenied, "{token}");
    }
    for token in [SHOPCTRL, INGRESS, FLOW_CALLBACK] {
        let status = client
            .get_routing_shop(call(shop(), token, Some(OWNER)))
            .await
            .expect_err("routing only");
        assert_eq!(status.code(), Code::PermissionDenied, "{token}");
        let status = client
            .get_employee_access(call(access(), token, Some(OWNER)))
            .await
            .expect_err("routing only");
        assert_eq!(status.code(), Code::PermissionDenied, "{token}");
    }

    // Access answers before a shop has settings, once config knows the shop from a role.
    service
        .grant_role("shop-new", "emp-new", Role::ShopEmployee)
        .await;
    let early = client
        .get_employee_access(call(
            GetEmployeeAccessRequest {
                shop_id: "shop-new".into(),
                employee_id: "emp-new".into(),
            },
            ROUTING,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(early.role(), Role::ShopEmployee);
    let status = client
        .get_employee_access(call(
            GetEmployeeAccessRequest {
                shop_id: "shop-unknown".into(),
                employee_id: "emp-new".into(),
            },
            ROUTING,
            None,
        ))
        .await
        .expect_err("unknown shop");
    assert_eq!(status.code(), Code::NotFound);

    // Unknown shops are NOT_FOUND.
    let unknown = || GetInternalShopRequest {
        shop_id: "shop-unknown".into(),
    };
    for status in [
        client
            .get_ingress_shop(call(unknown(), INGRESS, None))
            .await
            .expect_err("unknown"),
        client
            .get_delivery_shop(call(unknown(), FLOW_CALLBACK, None))
            .await
            .expect_err("unknown"),
        client
            .get_routing_shop(call(unknown(), ROUTING, None))
            .await
            .expect_err("unknown"),
    ] {
        assert_eq!(status.code(), Code::NotFound);
    }
    Ok(())
}
