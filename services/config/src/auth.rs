//! Who is calling: the service token in `authorization: Bearer <token>` names the caller
//! (shopctrl, ingress, routing, flow-callback), and `x-shopctrl-employee-id` names the
//! employee ShopCtrl acts for. The interceptor refuses unknown tokens before any handler runs.

use shopctrl_domain::EmployeeId;
use tonic::{Request, Status, service::Interceptor};

use crate::metrics::Metrics;

/// Metadata key of the acting employee.
pub const EMPLOYEE_HEADER: &str = "x-shopctrl-employee-id";

pub use shopctrl_runtime::tokens::{Caller, Tokens};

/// Authenticates every request and stores the [`Caller`] in its extensions.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Tokens,
    metrics: Metrics,
}

impl Authenticator {
    pub fn new(tokens: Tokens, metrics: Metrics) -> Self {
        Self { tokens, metrics }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let caller = presented.and_then(|token| self.tokens.caller_for(token.as_bytes()));
        match caller {
            Some(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            None => {
                // The method is unknown here; the interceptor sits in front of the router.
                self.metrics
                    .observe("unauthenticated", tonic::Code::Unauthenticated);
                Err(Status::unauthenticated(
                    "a valid service token is required (authorization: Bearer <token>)",
                ))
            }
        }
    }
}

/// The caller stored by the interceptor.
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .copied()
        .ok_or_else(|| Status::unauthenticated("a valid service token is required"))
}

/// The acting employee from the metadata.
pub fn acting_employee<T>(request: &Request<T>) -> Result<EmployeeId, Status> {
    let raw = request
        .metadata()
        .get(EMPLOYEE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "metadata {EMPLOYEE_HEADER} (the acting employee) is required"
            ))
        })?;
    EmployeeId::parse(raw.trim()).map_err(|e| {
        Status::permission_denied(format!("metadata {EMPLOYEE_HEADER} is invalid: {e}"))
    })
}
