//! The JSON an availability event is posted as: flat keys, so a flow's webhook trigger can map
//! each one to a flow variable.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use shopctrl_proto::v1::{FlowEvent, UnassignedReason, flow_event::Outcome};

/// Why a flow event cannot be turned into a payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlowEventError {
    #[error("the flow event has no outcome")]
    NoOutcome,
    #[error("the flow event has no event id")]
    NoEventId,
    #[error("the flow event has no shop id")]
    NoShop,
}

/// The body posted to the shop's event webhook URL.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowPayload {
    /// `employee_assigned` or `no_employee_available`.
    pub event: &'static str,
    /// True when an employee took the conversation: the simplest branch condition for a flow.
    pub available: bool,
    pub event_id: String,
    /// RFC 3339, when routing decided.
    pub occurred_at: String,
    /// What MessageBird flow invocations use to tie a call to a contact: the contact's MSISDN
    /// when known, otherwise the MessageBird conversation id.
    pub identifier: String,
    pub shop_id: String,
    pub conversation_id: String,
    pub messagebird_conversation_id: String,
    pub contact_id: String,
    pub msisdn: String,
    pub contact_name: String,
    /// Empty unless assigned.
    pub employee_id: String,
    pub employee_name: String,
    /// True when a waiting conversation was assigned later (not as the handover's answer).
    pub from_queue: bool,
    /// 1-based position in the shop's queue; 0 unless waiting.
    pub queue_position: u32,
    /// Why nobody is available (`slots_zero`, `no_permission`, `all_full`, `all_away`, ...);
    /// empty unless waiting.
    pub reason: &'static str,
}

/// When the event happened, if it says.
pub fn occurred_at(event: &FlowEvent) -> Option<DateTime<Utc>> {
    let ts = event.meta.as_ref()?.occurred_at.as_ref()?;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap_or(0))
}

fn reason_name(reason: i32) -> &'static str {
    match UnassignedReason::try_from(reason).unwrap_or(UnassignedReason::Unspecified) {
        UnassignedReason::Unspecified => "unspecified",
        UnassignedReason::SlotsZero => "slots_zero",
        UnassignedReason::NoPermission => "no_permission",
        UnassignedReason::AllFull => "all_full",
        UnassignedReason::AllAway => "all_away",
        UnassignedReason::AwaitingHandover => "awaiting_handover",
    }
}

/// Builds the payload.
pub fn payload(event: &FlowEvent) -> Result<FlowPayload, FlowEventError> {
    let event_id = event
        .meta
        .as_ref()
        .map(|m| m.event_id.clone())
        .filter(|id| !id.is_empty())
        .ok_or(FlowEventError::NoEventId)?;
    if event.shop_id.is_empty() {
        return Err(FlowEventError::NoShop);
    }
    let contact = event.contact.clone().unwrap_or_default();
    let identifier = if contact.msisdn.is_empty() {
        event.messagebird_conversation_id.clone()
    } else {
        contact.msisdn.clone()
    };
    let mut payload = FlowPayload {
        event: "",
        available: false,
        event_id,
        occurred_at: occurred_at(event)
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Millis, true),
        identifier,
        shop_id: event.shop_id.clone(),
        conversation_id: event.conversation_id.clone(),
        messagebird_conversation_id: event.messagebird_conversation_id.clone(),
        contact_id: contact.messagebird_contact_id,
        msisdn: contact.msisdn,
        contact_name: contact.display_name,
        employee_id: String::new(),
        employee_name: String::new(),
        from_queue: false,
        queue_position: 0,
        reason: "",
    };
    match event.outcome.as_ref().ok_or(FlowEventError::NoOutcome)? {
        Outcome::Assigned(assigned) => {
            payload.event = "employee_assigned";
            payload.available = true;
            payload.employee_id = assigned.employee_id.clone();
            payload.employee_name = assigned.display_name.clone();
            payload.from_queue = assigned.from_queue;
        }
        Outcome::Waiting(waiting) => {
            payload.event = "no_employee_available";
            payload.queue_position = waiting.queue_position;
            payload.reason = reason_name(waiting.reason);
        }
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use shopctrl_proto::v1::{
        EventMeta, FlowEmployeeAssigned, FlowNoEmployeeAvailable, InboundContact,
    };

    use super::*;

    fn event(outcome: Outcome) -> FlowEvent {
        FlowEvent {
            meta: Some(EventMeta {
                event_id: "e1".into(),
                occurred_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                producer: "routing".into(),
            }),
            shop_id: "shop-1".into(),
            conversation_id: "c1".into(),
            messagebird_conversation_id: "mb1".into(),
            contact: Some(InboundContact {
                messagebird_contact_id: "ct".into(),
                msisdn: "31612345678".into(),
                display_name: "Jane".into(),
            }),
            outcome: Some(outcome),
        }
    }

    #[test]
    fn assigned_payload() -> Result<(), FlowEventError> {
        let p = payload(&event(Outcome::Assigned(FlowEmployeeAssigned {
            employee_id: "emp-7".into(),
            display_name: "Ann".into(),
            from_queue: true,
        })))?;
        assert_eq!(p.event, "employee_assigned");
        assert!(p.available);
        assert_eq!(p.employee_name, "Ann");
        assert!(p.from_queue);
        assert_eq!(p.identifier, "31612345678");
        assert_eq!(p.occurred_at, "2023-11-14T22:13:20.000Z");
        Ok(())
    }

    #[test]
    fn waiting_payload() -> Result<(), FlowEventError> {
        let mut e = event(Outcome::Waiting(FlowNoEmployeeAvailable {
            queue_position: 3,
            reason: UnassignedReason::AllFull as i32,
        }));
        e.contact = None;
        let p = payload(&e)?;
        assert_eq!(p.event, "no_employee_available");
        assert!(!p.available);
        assert_eq!(p.queue_position, 3);
        assert_eq!(p.reason, "all_full");
        assert_eq!(p.identifier, "mb1");
        Ok(())
    }

    #[test]
    fn incomplete_events_are_refused() {
        let mut e = event(Outcome::Waiting(FlowNoEmployeeAvailable::default()));
        e.outcome = None;
        assert_eq!(payload(&e), Err(FlowEventError::NoOutcome));
        e.meta = None;
        assert_eq!(payload(&e), Err(FlowEventError::NoEventId));
    }
}
