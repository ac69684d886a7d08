-- What the notification service "sent": its fake e-mail and SMS senders record every message here.
CREATE TABLE notifications (
    id         uuid PRIMARY KEY,
    order_id   text,
    channel    text        NOT NULL CHECK (channel IN ('EMAIL', 'SMS')),
    recipient  text        NOT NULL CHECK (length(recipient) BETWEEN 3 AND 254),
    subject    text,
    body       text        NOT NULL CHECK (length(body) BETWEEN 1 AND 4000),
    sent_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX notifications_order_idx ON notifications (order_id, sent_at);

-- Events already handled, written in the same transaction as the notification they caused, so an event
-- delivered twice notifies once.
CREATE TABLE processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
