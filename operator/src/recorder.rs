//! Publishing Kubernetes Events without holding up the caller: a controller's progress never waits for, or fails
//! on, an Event. One that cannot be written is logged and dropped.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::metrics;

/// An Event to publish about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Warning or Normal.
    pub warning: bool,
    /// The Event's reason.
    pub reason: &'static str,
    /// The recorder merges Events with equal reason and action into one series; a distinct action (e.g. naming a
    /// saga's step) keeps them apart. Defaults to the reason.
    pub action: Option<String>,
    /// What happened, cut to 1,000 characters.
    pub message: String,
}

/// Publishes `notices` about `reference` in a background task, in order.
pub fn publish(recorder: &Recorder, reference: ObjectReference, notices: Vec<Notice>) {
    if notices.is_empty() {
        return;
    }
    let recorder = recorder.clone();
    tokio::spawn(async move {
        for notice in notices {
            let event = Event {
                type_: if notice.warning { EventType::Warning } else { EventType::Normal },
                reason: notice.reason.to_owned(),
                note: Some(notice.message.chars().take(1000).collect()),
                action: notice.action.map_or_else(|| notice.reason.to_owned(), |a| a.chars().take(128).collect()),
                secondary: None,
            };
            match recorder.publish(&event, &reference).await {
                Ok(()) => metrics::api_write("event"),
                Err(err) => tracing::warn!(error = %err, reason = notice.reason, "cannot publish event"),
            }
        }
    });
}
