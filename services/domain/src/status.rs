use shopctrl_proto::v1::MessageStatus;

/// Maps MessageBird's status string onto our ranked status.
pub fn message_status_from_messagebird(raw: &str) -> MessageStatus {
    match raw {
        "accepted" | "pending" | "buffered" | "dispatched" => MessageStatus::Pending,
        "sent" | "transmitted" => MessageStatus::Sent,
        "delivered" => MessageStatus::Delivered,
        "read" | "opened" | "clicked" => MessageStatus::Read,
        "received" => MessageStatus::Received,
        "failed" | "delivery_failed" | "expired" | "bounce" => MessageStatus::Failed,
        "rejected" => MessageStatus::Rejected,
        "deleted" => MessageStatus::Deleted,
        _ => MessageStatus::Other,
    }
}

/// Progress rank: an update applies only when it does not go backwards. Failures and
/// deletions are terminal.
pub fn status_rank(status: MessageStatus) -> u8 {
    match status {
        MessageStatus::Unspecified | MessageStatus::Other => 0,
        MessageStatus::Pending => 1,
        MessageStatus::Sent => 2,
        MessageStatus::Delivered => 3,
        MessageStatus::Read | MessageStatus::Received => 4,
        MessageStatus::Failed | MessageStatus::Rejected | MessageStatus::Deleted => 5,
    }
}

/// Whether `next` may replace `current` (never read → delivered, never out of a terminal state).
pub fn status_update_allowed(current: MessageStatus, next: MessageStatus) -> bool {
    status_rank(next) > status_rank(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_downgrades() {
        assert!(status_update_allowed(
            MessageStatus::Sent,
            MessageStatus::Delivered
        ));
        assert!(!status_update_allowed(
            MessageStatus::Read,
            MessageStatus::Delivered
        ));
        assert!(!status_update_allowed(
            MessageStatus::Failed,
            MessageStatus::Read
        ));
        assert!(!status_update_allowed(
            MessageStatus::Read,
            MessageStatus::Read
        ));
        assert_eq!(
            message_status_from_messagebird("transmitted"),
            MessageStatus::Sent
        );
        assert_eq!(
            message_status_from_messagebird("weird"),
            MessageStatus::Other
        );
    }
}
