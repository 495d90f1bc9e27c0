//! The errors of a gRPC call and the status each becomes. Internal causes are logged, never
//! sent to the caller.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{crypto::CryptoError, validate::Violation};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {0:?}")]
    Invalid(Vec<Violation>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{message}")]
    FailedPrecondition {
        /// A PreconditionFailure type such as `VERSION` or `ROLE`.
        kind: &'static str,
        subject: String,
        message: String,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox error: {0}")]
    Outbox(#[from] shopctrl_amqp::OutboxError),
    #[error("secret encryption error: {0}")]
    Crypto(#[from] CryptoError),
}

impl ServiceError {
    /// One invalid field.
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        Self::Invalid(vec![Violation {
            field: field.to_owned(),
            description: description.into(),
        }])
    }

    pub fn stale_version(shop_id: &str, expected: u64, current: u64) -> Self {
        let message = if current == 0 {
            format!(
                "shop {shop_id} has no settings yet; pass expected_version 0 to create them \
                 (you passed {expected})"
            )
        } else if expected == 0 {
            format!(
                "shop {shop_id} already has settings (version {current}); read them and pass \
                 that version as expected_version"
            )
        } else {
            format!(
                "the settings of shop {shop_id} changed since you read them: expected version \
                 {expected}, current version {current}; read them again and retry"
            )
        };
        Self::FailedPrecondition {
            kind: "VERSION",
            subject: format!("shops/{shop_id}/settings"),
            message,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Invalid(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                let message = format!("invalid fields: {}", fields.join(", "));
                let mut details = ErrorDetails::new();
                for violation in &violations {
                    details.add_bad_request_violation(&violation.field, &violation.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ServiceError::NotFound(message) => Status::not_found(message),
            ServiceError::PermissionDenied(message) => Status::permission_denied(message),
            ServiceError::FailedPrecondition {
                kind,
                subject,
                message,
            } => {
                let mut details = ErrorDetails::new();
                details.add_precondition_failure_violation(kind, subject, message.clone());
                Status::with_error_details(Code::FailedPrecondition, message, details)
            }
            ServiceError::Database(error) => {
                tracing::error!(%error, "database error");
                if is_transient(&error) {
                    Status::unavailable("the config database is unavailable; retry")
                } else {
                    Status::internal("the config database failed")
                }
            }
            ServiceError::Outbox(error) => {
                tracing::error!(%error, "outbox error");
                Status::unavailable("the config database is unavailable; retry")
            }
            ServiceError::Crypto(error) => {
                // Never includes secret material: CryptoError carries key ids at most.
                tracing::error!(%error, "secret encryption error");
                Status::internal("a stored secret cannot be decrypted with the configured keys")
            }
        }
    }
}

/// Errors that go away by themselves (connection lost, pool exhausted, serialization
/// conflicts): the caller may retry.
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code == "40001" || code == "40P01" || code == "57P01"
        }),
        _ => false,
    }
}
