//! Fake senders: instead of talking to an e-mail or SMS provider they record the message in `notifications`,
//! inside the caller's transaction, so a notification and the event that caused it commit together.

use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgConnection};
use utoipa::ToSchema;
use uuid::Uuid;

/// How a message is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Channel {
    /// E-mail: needs a subject.
    Email,
    /// Text message.
    Sms,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Self::Email => "EMAIL",
            Self::Sms => "SMS",
        }
    }
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Message {
    /// Delivery channel.
    pub channel: Channel,
    /// E-mail address or phone number.
    pub recipient: String,
    /// Subject (e-mail only).
    #[serde(default)]
    pub subject: Option<String>,
    /// Text, 1 to 4000 characters.
    pub body: String,
    /// The order the message is about.
    #[serde(default)]
    pub order_id: Option<String>,
}

/// A message as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sent {
    /// Id of the notification.
    pub id: Uuid,
    /// The order it is about.
    pub order_id: Option<String>,
    /// EMAIL or SMS.
    pub channel: String,
    /// Where it went.
    pub recipient: String,
    /// Subject, for e-mail.
    pub subject: Option<String>,
    /// Text.
    pub body: String,
}

/// Why a message cannot be sent; each names the field to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The recipient does not fit the channel.
    #[error("recipient: {0}")]
    Recipient(&'static str),
    /// The subject is missing or too long.
    #[error("subject: {0}")]
    Subject(&'static str),
    /// The body is empty or too long.
    #[error("body: {0}")]
    Body(&'static str),
}

impl Invalid {
    /// The field to name in a problem.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Recipient(_) => "recipient",
            Self::Subject(_) => "subject",
            Self::Body(_) => "body",
        }
    }
}

impl Message {
    /// Checks the message against its channel's rules.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self.channel {
            Channel::Email if !(self.recipient.contains('@') && (3..=254).contains(&self.recipient.len())) => {
                return Err(Invalid::Recipient("an e-mail needs an e-mail address"));
            }
            Channel::Sms
                if !(self.recipient.starts_with('+')
                    && (8..=16).contains(&self.recipient.len())
                    && self.recipient[1..].bytes().all(|b| b.is_ascii_digit())) =>
            {
                return Err(Invalid::Recipient("an SMS needs a phone number in E.164 form, e.g. +4915112345678"));
            }
            Channel::Email if self.subject.as_deref().is_none_or(|s| s.is_empty() || s.len() > 200) => {
                return Err(Invalid::Subject("an e-mail needs a subject of 1 to 200 characters"));
            }
            _ => {}
        }
        if self.body.is_empty() || self.body.chars().count() > 4000 {
            return Err(Invalid::Body("the text must be 1 to 4000 characters"));
        }
        Ok(())
    }
}

/// "Sends" `message` by recording it through `tx`.
pub async fn send(tx: &mut PgConnection, message: &Message) -> Result<Sent, sqlx::Error> {
    let sent = sqlx::query_as::<_, Sent>(
        "INSERT INTO notifications (id, order_id, channel, recipient, subject, body) VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, order_id, channel, recipient, subject, body",
    )
    .bind(Uuid::new_v4())
    .bind(&message.order_id)
    .bind(message.channel.as_str())
    .bind(&message.recipient)
    .bind(&message.subject)
    .bind(&message.body)
    .fetch_one(tx)
    .await?;
    tracing::info!(channel = %sent.channel, recipient = %sent.recipient, order_id = ?sent.order_id, "notification sent (fake sender)");
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: Channel, recipient: &str, subject: Option<&str>, body: &str) -> Message {
        Message {
            channel,
            recipient: recipient.into(),
            subject: subject.map(Into::into),
            body: body.into(),
            order_id: None,
        }
    }

    #[test]
    fn each_channel_checks_its_own_rules() {
        assert!(message(Channel::Email, "a@b.c", Some("Hi"), "text").validate().is_ok());
        assert!(message(Channel::Sms, "+4915112345678", None, "text").validate().is_ok());
        assert_eq!(
            message(Channel::Email, "nobody", Some("Hi"), "t").validate().map_err(|e| e.field()),
            Err("recipient")
        );
        assert_eq!(message(Channel::Email, "a@b.c", None, "t").validate().map_err(|e| e.field()), Err("subject"));
        assert_eq!(message(Channel::Sms, "0151", None, "t").validate().map_err(|e| e.field()), Err("recipient"));
        assert_eq!(message(Channel::Sms, "+4915112345678", None, "").validate().map_err(|e| e.field()), Err("body"));
    }
}
