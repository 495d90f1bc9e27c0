//! Who is calling: the service token in `authorization: Bearer <token>` names the caller
//! (shopctrl, ingress, routing, flow-callback), and `x-shopctrl-employee-id` names the
//! employee ShopCtrl acts for. The interceptor refuses unknown tokens before any handler runs.

use std::{fmt, sync::Arc};

use shopctrl_domain::EmployeeId;
use tonic::{Request, Status, service::Interceptor};

use crate::metrics::Metrics;

/// Metadata key of the acting employee.
pub const EMPLOYEE_HEADER: &str = "x-shopctrl-employee-id";

/// A service allowed to call us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// ShopCtrl's own backend (admin UI, agent workspace): the admin API.
    Shopctrl,
    Ingress,
    Routing,
    FlowCallback,
}

impl Caller {
    pub fn name(self) -> &'static str {
        match self {
            Caller::Shopctrl => "shopctrl",
            Caller::Ingress => "ingress",
            Caller::Routing => "routing",
            Caller::FlowCallback => "flow-callback",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "shopctrl" => Some(Caller::Shopctrl),
            "ingress" => Some(Caller::Ingress),
            "routing" => Some(Caller::Routing),
            "flow-callback" => Some(Caller::FlowCallback),
            _ => None,
        }
    }
}

/// Why `AUTH_TOKENS` was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("AUTH_TOKENS entry {0} is not `caller=token`")]
    Malformed(usize),
    #[error(
        "AUTH_TOKENS names unknown caller {0:?} (known: shopctrl, ingress, routing, flow-callback)"
    )]
    UnknownCaller(String),
    #[error("AUTH_TOKENS token for {0} is shorter than 16 characters")]
    WeakToken(&'static str),
    #[error("AUTH_TOKENS gives the same token to two callers")]
    SharedToken,
}

/// The token → caller map.
#[derive(Clone)]
pub struct Tokens {
    entries: Arc<Vec<(Caller, Vec<u8>)>>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let callers: Vec<&str> = self.entries.iter().map(|(c, _)| c.name()).collect();
        f.debug_struct("Tokens").field("callers", &callers).finish()
    }
}

impl Tokens {
    /// Parses `caller=token,...`. A caller may have several tokens (to rotate them).
    pub fn parse(spec: &str) -> Result<Self, AuthConfigError> {
        let mut entries: Vec<(Caller, Vec<u8>)> = Vec::new();
        for (index, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (name, token) = entry
                .split_once('=')
                .ok_or(AuthConfigError::Malformed(index + 1))?;
            let caller = Caller::parse(name.trim())
                .ok_or_else(|| AuthConfigError::UnknownCaller(name.trim().to_owned()))?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(AuthConfigError::WeakToken(caller.name()));
            }
            if entries
                .iter()
                .any(|(_, t)| t.as_slice() == token.as_bytes())
            {
                return Err(AuthConfigError::SharedToken);
            }
            entries.push((caller, token.as_bytes().to_vec()));
        }
        Ok(Self {
            entries: Arc::new(entries),
        })
    }

    /// The development tokens `dev-<caller>-token` (the caller logs a warning).
    pub fn development() -> Self {
        let entries = [
            Caller::Shopctrl,
            Caller::Ingress,
            Caller::Routing,
            Caller::FlowCallback,
        ]
        .into_iter()
        .map(|c| (c, format!("dev-{}-token", c.name()).into_bytes()))
        .collect();
        Self {
            entries: Arc::new(entries),
        }
    }

    /// The caller a presented token belongs to. Every configured token is compared in constant
    /// time, so timing does not reveal how much of a token matched.
    pub fn caller_for(&self, presented: &[u8]) -> Option<Caller> {
        let mut found = None;
        for (caller, token) in self.entries.iter() {
            if aws_lc_rs::constant_time::verify_slices_are_equal(token, presented).is_ok() {
                found = Some(*caller);
            }
        }
        found
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_tokens_to_callers() -> Result<(), AuthConfigError> {
        let tokens = Tokens::parse(
            "shopctrl=aaaaaaaaaaaaaaaa, ingress=bbbbbbbbbbbbbbbb,shopctrl=cccccccccccccccc",
        )?;
        assert_eq!(
            tokens.caller_for(b"aaaaaaaaaaaaaaaa"),
            Some(Caller::Shopctrl)
        );
        assert_eq!(
            tokens.caller_for(b"cccccccccccccccc"),
            Some(Caller::Shopctrl)
        );
        assert_eq!(
            tokens.caller_for(b"bbbbbbbbbbbbbbbb"),
            Some(Caller::Ingress)
        );
        assert_eq!(tokens.caller_for(b"aaaaaaaaaaaaaaa"), None);
        assert_eq!(tokens.caller_for(b""), None);
        assert!(Tokens::parse("admin=aaaaaaaaaaaaaaaa").is_err());
        assert!(Tokens::parse("shopctrl=short").is_err());
        assert!(Tokens::parse("shopctrl").is_err());
        assert!(Tokens::parse("shopctrl=aaaaaaaaaaaaaaaa,routing=aaaaaaaaaaaaaaaa").is_err());
        assert_eq!(
            Tokens::development().caller_for(b"dev-flow-callback-token"),
            Some(Caller::FlowCallback)
        );
        Ok(())
    }
}
