//! Who is calling: service tokens (`AUTH_TOKENS` = `caller=token,...`) mapped to callers, and
//! the acting employee from `x-shopctrl-employee-id`. Only ShopCtrl (`shopctrl`) may use the
//! agent API; what the employee may do is checked per call against routing's local copy of
//! the config service's roles and permissions.

use std::{collections::HashMap, sync::Arc};

use shopctrl_domain::EmployeeId;
use tonic::{Request, Status};

/// The callers that exist, each with its development token.
const CALLERS: [&str; 4] = ["shopctrl", "ingress", "routing", "flow-callback"];

/// Why `AUTH_TOKENS` is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("AUTH_TOKENS entry {0:?} is not caller=token")]
    Malformed(String),
    #[error("AUTH_TOKENS names an unknown caller {0:?}")]
    UnknownCaller(String),
    #[error("AUTH_TOKENS gives caller {0:?} an empty token")]
    EmptyToken(String),
}

/// Token → caller.
#[derive(Clone)]
pub struct Tokens {
    by_token: Arc<HashMap<String, &'static str>>,
}

impl Tokens {
    /// Parses `caller=token,...`; `None` gives the development tokens.
    pub fn parse(raw: Option<&str>) -> Result<Self, AuthConfigError> {
        let mut by_token = HashMap::new();
        match raw {
            None => {
                tracing::warn!("AUTH_TOKENS is not set; accepting the development tokens");
                for caller in CALLERS {
                    by_token.insert(format!("dev-{caller}-token"), caller);
                }
            }
            Some(raw) => {
                for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    let (caller, token) = entry
                        .split_once('=')
                        .ok_or_else(|| AuthConfigError::Malformed(mask_entry(entry)))?;
                    let caller = CALLERS
                        .iter()
                        .find(|c| **c == caller.trim())
                        .ok_or_else(|| AuthConfigError::UnknownCaller(caller.trim().to_owned()))?;
                    if token.trim().is_empty() {
                        return Err(AuthConfigError::EmptyToken((*caller).to_owned()));
                    }
                    by_token.insert(token.trim().to_owned(), *caller);
                }
            }
        }
        Ok(Self {
            by_token: Arc::new(by_token),
        })
    }

    fn caller(&self, token: &str) -> Option<&'static str> {
        // A HashMap lookup is not constant time, but tokens are high-entropy and looked up by
        // their full value, so timing reveals nothing usable.
        self.by_token.get(token).copied()
    }
}

fn mask_entry(entry: &str) -> String {
    shopctrl_domain::mask(entry)
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
            .caller(token.trim())
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if caller != "shopctrl" {
            return Err(Status::permission_denied(format!(
                "caller {caller} may not use the agent API"
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
            caller,
            employee_id,
        });
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_refuses_garbage() -> Result<(), AuthConfigError> {
        let tokens = Tokens::parse(Some("shopctrl=abc, routing=def"))?;
        assert_eq!(tokens.caller("abc"), Some("shopctrl"));
        assert_eq!(tokens.caller("def"), Some("routing"));
        assert_eq!(tokens.caller("dev-shopctrl-token"), None);
        assert!(Tokens::parse(Some("nobody=x")).is_err());
        assert!(Tokens::parse(Some("shopctrl")).is_err());
        assert!(Tokens::parse(Some("shopctrl=")).is_err());
        let dev = Tokens::parse(None)?;
        assert_eq!(dev.caller("dev-shopctrl-token"), Some("shopctrl"));
        Ok(())
    }
}
