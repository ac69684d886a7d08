//! What the customer is told about an order event. Pure: the consumer decides with it, the tests check every case.

use kubesaga_events::StreamEvent;
use serde::Deserialize;

use crate::{
    NotificationError,
    senders::{Channel, Message},
};

/// An order was recorded (PENDING); its saga is about to run.
pub const ORDER_CREATED: &str = "OrderCreated";
/// The order's saga succeeded: stock taken, payment captured.
pub const ORDER_APPROVED: &str = "OrderApproved";
/// The order's saga compensated: nothing was taken or charged.
pub const ORDER_CANCELLED: &str = "OrderCancelled";

/// The part of the order service's `Order` (the payload of its events) that a message needs. Other fields are
/// ignored, so the order service can add fields without breaking this reader.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Order {
    id: String,
    customer_email: String,
    sku: String,
    quantity: i64,
    amount_cents: i64,
    currency: String,
}

/// The message `event` calls for, checked against the sender's rules.
///
/// `OrderApproved` sends an "order confirmed" e-mail and `OrderCancelled` an "order cancelled" one, to the
/// order's customer e-mail (orders carry no phone number, so there is no SMS). `OrderCreated` sends nothing: the
/// customer hears how the checkout ended, not that it started. Its payload is still checked, so a broken producer
/// shows up on the dead-letter stream. Event types this service does not know send nothing either, so the order
/// service can add some without breaking its consumers.
pub fn message(event: &StreamEvent) -> Result<Option<Message>, NotificationError> {
    let event_type = event.event_type.as_str();
    if ![ORDER_CREATED, ORDER_APPROVED, ORDER_CANCELLED].contains(&event_type) {
        return Ok(None);
    }
    let order: Order = serde_json::from_str(&event.payload)
        .map_err(|source| NotificationError::Payload { event_type: event_type.to_owned(), source })?;
    let amount = amount(order.amount_cents, &order.currency);
    let (subject, body) = match event_type {
        ORDER_APPROVED => (
            "Your order is confirmed",
            format!(
                "Thank you for your order {}: {} × {} for {amount}. The payment is captured and your order is on \
                 its way.",
                order.id, order.quantity, order.sku
            ),
        ),
        ORDER_CANCELLED => (
            "Your order was cancelled",
            format!(
                "Your order {} ({} × {} for {amount}) could not be completed and was cancelled. You have not been \
                 charged.",
                order.id, order.quantity, order.sku
            ),
        ),
        // OrderCreated: its payload was worth checking, but it calls for no message.
        _ => return Ok(None),
    };
    let message = Message {
        channel: Channel::Email,
        recipient: order.customer_email,
        subject: Some(subject.to_owned()),
        body,
        order_id: Some(order.id),
    };
    message.validate()?;
    Ok(Some(message))
}

/// The event type as a metric label: the types above by name, anything else as `other`, so a misbehaving producer
/// cannot create label values without bound.
pub fn type_label(event_type: &str) -> &'static str {
    [ORDER_CREATED, ORDER_APPROVED, ORDER_CANCELLED].into_iter().find(|known| *known == event_type).unwrap_or("other")
}

/// An amount in minor units as customers read it, e.g. `42.00 EUR`.
fn amount(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"{"id":"5f0c","customerEmail":"ada@example.com","sku":"BOOK-1","quantity":2,
        "amountCents":4200,"currency":"EUR","status":"APPROVED","version":2,"saga":"shop/order-5f0c"}"#;

    fn event(event_type: &str, payload: &str) -> StreamEvent {
        StreamEvent {
            event_id: "e-1".into(),
            event_type: event_type.into(),
            aggregate_type: "order".into(),
            aggregate_id: "5f0c".into(),
            payload: payload.into(),
            ..StreamEvent::default()
        }
    }

    #[test]
    fn an_approved_order_is_confirmed_by_email() {
        let message = message(&event(ORDER_APPROVED, ORDER)).expect("valid").expect("a message");
        assert_eq!(message.channel, Channel::Email);
        assert_eq!(message.recipient, "ada@example.com");
        assert_eq!(message.subject.as_deref(), Some("Your order is confirmed"));
        assert_eq!(message.order_id.as_deref(), Some("5f0c"));
        assert!(message.body.contains("5f0c: 2 × BOOK-1 for 42.00 EUR"), "{}", message.body);
    }

    #[test]
    fn a_cancelled_order_is_reported_by_email() {
        let message = message(&event(ORDER_CANCELLED, ORDER)).expect("valid").expect("a message");
        assert_eq!(message.subject.as_deref(), Some("Your order was cancelled"));
        assert_eq!(message.recipient, "ada@example.com");
        assert!(message.body.contains("(2 × BOOK-1 for 42.00 EUR)"), "{}", message.body);
        assert!(message.body.contains("not been charged"), "{}", message.body);
    }

    #[test]
    fn a_created_order_sends_nothing_but_its_payload_is_checked() {
        assert!(message(&event(ORDER_CREATED, ORDER)).expect("valid").is_none());
        let err = message(&event(ORDER_CREATED, "{}")).expect_err("no order");
        assert!(matches!(err, NotificationError::Payload { .. }) && err.rejects_entry(), "{err}");
    }

    #[test]
    fn unknown_event_types_send_nothing_whatever_their_payload() {
        assert!(message(&event("OrderShipped", "not json")).expect("ignored").is_none());
    }

    #[test]
    fn a_payload_that_is_not_an_order_is_rejected_with_the_event_type() {
        for payload in [
            "not json",
            "[]",
            r#"{"id":"1"}"#,
            r#"{"id":"1","customerEmail":"a@b.c","sku":"X","quantity":"two","amountCents":1,"currency":"EUR"}"#,
        ] {
            let err = message(&event(ORDER_APPROVED, payload)).expect_err(payload);
            assert!(err.to_string().starts_with("the payload of OrderApproved is not an order"), "{err}");
            assert!(err.rejects_entry());
        }
    }

    #[test]
    fn a_message_the_sender_would_refuse_is_rejected_with_the_field() {
        let payload = ORDER.replace("ada@example.com", "nobody");
        let err = message(&event(ORDER_APPROVED, &payload)).expect_err("no address");
        assert!(matches!(&err, NotificationError::Message(invalid) if invalid.field() == "recipient"), "{err}");
        assert!(err.rejects_entry());
    }

    #[test]
    fn amounts_read_as_currency() {
        assert_eq!(amount(4200, "EUR"), "42.00 EUR");
        assert_eq!(amount(5, "USD"), "0.05 USD");
        assert_eq!(amount(123_456, "GBP"), "1234.56 GBP");
        assert_eq!(amount(0, "EUR"), "0.00 EUR");
        assert_eq!(amount(-250, "EUR"), "-2.50 EUR");
        assert_eq!(amount(i64::MIN, "EUR"), "-92233720368547758.08 EUR");
    }

    #[test]
    fn only_known_event_types_become_labels() {
        for known in [ORDER_CREATED, ORDER_APPROVED, ORDER_CANCELLED] {
            assert_eq!(type_label(known), known);
        }
        assert_eq!(type_label("OrderShipped"), "other");
        assert_eq!(type_label(""), "other");
    }
}
