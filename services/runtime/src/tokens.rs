//! Service tokens: `AUTH_TOKENS` = `caller=token,...` names which service presents which bearer
//! token. Every gRPC server of the system reads it the same way, so an operator's value means
//! the same thing (and is refused for the same reasons) wherever it is set.

use std::{fmt, sync::Arc};

/// A service allowed to call us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// ShopCtrl's own backend (admin UI, agent workspace).
    Shopctrl,
    Ingress,
    Routing,
    FlowCallback,
}

impl Caller {
    pub const ALL: [Caller; 4] = [
        Caller::Shopctrl,
        Caller::Ingress,
        Caller::Routing,
        Caller::FlowCallback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Caller::Shopctrl => "shopctrl",
            Caller::Ingress => "ingress",
            Caller::Routing => "routing",
            Caller::FlowCallback => "flow-callback",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
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

    /// The development tokens `dev-<caller>-token` (the service logs a warning).
    pub fn development() -> Self {
        let entries = Caller::ALL
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
            if constant_time_eq(token, presented) {
                found = Some(*caller);
            }
        }
        found
    }
}

/// Equal lengths and contents, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_refuses_garbage() -> Result<(), AuthConfigError> {
        let tokens = Tokens::parse(" shopctrl=abcdefghijklmnop , routing=0123456789abcdef")?;
        assert_eq!(
            tokens.caller_for(b"abcdefghijklmnop"),
            Some(Caller::Shopctrl)
        );
        assert_eq!(
            tokens.caller_for(b"0123456789abcdef"),
            Some(Caller::Routing)
        );
        assert_eq!(tokens.caller_for(b"abcdefghijklmno"), None);
        assert_eq!(tokens.caller_for(b"dev-shopctrl-token"), None);
        assert!(matches!(
            Tokens::parse("nobody=abcdefghijklmnop"),
            Err(AuthConfigError::UnknownCaller(_))
        ));
        assert!(matches!(
            Tokens::parse("shopctrl"),
            Err(AuthConfigError::Malformed(1))
        ));
        assert!(matches!(
            Tokens::parse("shopctrl=short"),
            Err(AuthConfigError::WeakToken("shopctrl"))
        ));
        assert!(matches!(
            Tokens::parse("shopctrl=abcdefghijklmnop,ingress=abcdefghijklmnop"),
            Err(AuthConfigError::SharedToken)
        ));
        // Two tokens for one caller: a rotation.
        let rotating = Tokens::parse("ingress=abcdefghijklmnop,ingress=ponmlkjihgfedcba")?;
        assert_eq!(
            rotating.caller_for(b"ponmlkjihgfedcba"),
            Some(Caller::Ingress)
        );
        let dev = Tokens::development();
        assert_eq!(
            dev.caller_for(b"dev-shopctrl-token"),
            Some(Caller::Shopctrl)
        );
        assert_eq!(
            dev.caller_for(b"dev-flow-callback-token"),
            Some(Caller::FlowCallback)
        );
        Ok(())
    }
}
