//! Who is calling: service tokens (`AUTH_TOKENS` = `caller=token,...`) mapped to callers, and
//! the acting employee from `x-shopctrl-employee-id`. Only ShopCtrl (`shopctrl`) may use the
//! agent API; what the employee may do is checked per call against routing's local copy of
//! the config service's roles and permissions.

use shopctrl_domain::EmployeeId;
pub use shopctrl_runtime::tokens::{AuthConfigError, Caller, Tokens};
use tonic::{Request, Status};

/// `AUTH_TOKENS` as set, or the development tokens (with a warning) when it is not.
pub fn tokens_from_setting(raw: Option<&str>) -> Result<Tokens, AuthConfigError> {
    match raw {
        Some(raw) => Tokens::parse(raw),
        None => {
            tracing::warn!("AUTH_TOKENS is not set; accepting the development tokens");
            Ok(Tokens::development())
        }
    }
}

/// The authenticated caller and acting employee, put into request extensions.
#[derive(Debug, Clone)]
pub struct Acting {
    pub caller: &'static str,
    pub employee_id: EmployeeId,
}

/// Interceptor for the agent API: a known token of caller `shopctrl` and an employee id.
pub fn agent_interceptor(
    tokens: Tokens,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let caller = tokens
            .caller_for(token.trim().as_bytes())
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if caller != Caller::Shopctrl {
            return Err(Status::permission_denied(format!(
                "caller {} may not use the agent API",
                caller.name()
            )));
        }
        let employee = request
            .metadata()
            .get("x-shopctrl-employee-id")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("missing x-shopctrl-employee-id"))?;
        let employee_id = EmployeeId::parse(employee)
            .map_err(|e| Status::invalid_argument(format!("x-shopctrl-employee-id: {e}")))?;
        request.extensions_mut().insert(Acting {
            caller: caller.name(),
            employee_id,
        });
        Ok(request)
    }
}
