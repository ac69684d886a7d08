-- The transactional outbox every service with events shares (shaped like Debezium's outbox table), plus the
-- columns the OutboxRelay uses to claim, retry and retire rows, a dead-letter table, and a NOTIFY on insert so
-- the relay wakes at once instead of waiting for its next poll.
CREATE TABLE outbox (
    id              uuid PRIMARY KEY,
    -- Insertion order: per aggregate, events are published in this order.
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate_type  text        NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id    text        NOT NULL CHECK (aggregate_id <> ''),
    event_type      text        NOT NULL CHECK (event_type <> ''),
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'PROCESSING', 'PUBLISHED')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    claimed_at      timestamptz,
    published_at    timestamptz,
    last_error      text
);

-- Claiming: the oldest due PENDING rows.
CREATE INDEX outbox_pending_idx ON outbox (next_attempt_at, seq) WHERE status = 'PENDING';
-- Per-aggregate ordering: is there an earlier unpublished row of this aggregate?
CREATE INDEX outbox_unpublished_aggregate_idx ON outbox (aggregate_type, aggregate_id, seq) WHERE status <> 'PUBLISHED';
-- Zombie recovery: PROCESSING rows whose claim is too old.
CREATE INDEX outbox_processing_idx ON outbox (claimed_at) WHERE status = 'PROCESSING';
-- Retention: PUBLISHED rows older than the retention.
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE status = 'PUBLISHED';

CREATE TABLE outbox_dead_letter (
    id               uuid PRIMARY KEY,
    seq              bigint      NOT NULL,
    aggregate_type   text        NOT NULL,
    aggregate_id     text        NOT NULL,
    event_type       text        NOT NULL,
    payload          jsonb       NOT NULL,
    headers          jsonb       NOT NULL,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    last_error       text,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per statement is enough: the relay reads whatever is pending when it wakes.
    PERFORM pg_notify('outbox_' || TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
