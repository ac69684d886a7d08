-- Payments as the checkout saga drives them, the tombstones that keep a compensated payment id from being
-- authorized late, and the ledger of the fake payment gateway.

-- One row per payment; the id is chosen by the caller (the saga's payment id), so a retried authorization
-- finds the row instead of creating a second one. Every state change bumps `version` (optimistic locking).
CREATE TABLE payments (
    id             text        PRIMARY KEY CHECK (id <> ''),
    order_id       text        NOT NULL CHECK (order_id <> ''),
    amount_cents   bigint      NOT NULL CHECK (amount_cents > 0),
    currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    card_token     text        NOT NULL CHECK (card_token <> ''),
    status         text        NOT NULL CHECK (status IN ('AUTHORIZED', 'DECLINED', 'CAPTURED', 'VOIDED', 'REFUNDED')),
    gateway_ref    text,
    version        bigint      NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    decline_reason text,
    -- A declined payment says why; no other one does.
    CHECK ((status = 'DECLINED') = (decline_reason IS NOT NULL))
);

CREATE INDEX payments_order_id_idx ON payments (order_id);

-- A void that arrived before any authorization (the saga compensated an authorization whose answer it never
-- got) leaves a tombstone, so an authorization still under way for that id is refused instead of holding funds
-- that nothing would ever release.
CREATE TABLE payment_tombstones (
    id         text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The fake gateway's own memory of the calls it answered, by the caller's gateway idempotency key
-- (`<payment id>:<operation>`). A repeated key gets the first answer back, so a retry never charges twice; it
-- lives in Postgres so it survives restarts. A real gateway keeps this on its side.
CREATE TABLE gateway_ledger (
    idempotency_key text        PRIMARY KEY,
    operation       text        NOT NULL CHECK (operation IN ('authorize', 'capture', 'void', 'refund')),
    -- The authorization this call is about; for an authorization, the reference it created.
    reference       text        NOT NULL,
    amount_cents    bigint,
    currency        text,
    card_token      text,
    approved        boolean     NOT NULL,
    decline_reason  text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX gateway_ledger_reference_idx ON gateway_ledger (reference, operation);
