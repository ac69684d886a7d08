-- The inventory service's tables: products with their stock and the semantic lock a saga takes while it reserves,
-- and the reservations sagas hold until they confirm or cancel them.

CREATE TABLE products (
    sku            text        PRIMARY KEY CHECK (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    name           text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- Units on hand; `reserved` of them are promised to sagas, the rest are available.
    stock          integer     NOT NULL CHECK (stock >= 0),
    reserved       integer     NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    -- Optimistic locking: every write bumps it and is conditional on the value read.
    version        bigint      NOT NULL DEFAULT 0,
    -- Fencing token of the last Redis lock holder that wrote the row; a stale holder's write is refused.
    last_fence     bigint      NOT NULL DEFAULT 0,
    -- The semantic lock: set while a saga reserves from this row (see the crate docs for the policy).
    lock_state     text        NULL CHECK (lock_state IN ('RESERVING', 'RESERVED')),
    locked_by_saga text        NULL,
    locked_at      timestamptz NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- Reserved units are part of the stock, so there can never be more of them than units on hand.
    CONSTRAINT products_reserved_within_stock CHECK (reserved <= stock),
    -- A lock is all three columns or none, so a half-written lock cannot block a row forever.
    CONSTRAINT products_lock_complete CHECK (
        (lock_state IS NULL) = (locked_by_saga IS NULL) AND (lock_state IS NULL) = (locked_at IS NULL)
    )
);

-- The sweeper looks for old locks; cancelling an unknown reservation looks for the caller's locks.
CREATE INDEX products_locked_at_idx ON products (locked_at) WHERE lock_state IS NOT NULL;
CREATE INDEX products_locked_by_saga_idx ON products (locked_by_saga) WHERE lock_state IS NOT NULL;

CREATE TABLE reservations (
    -- Chosen by the saga (e.g. its uid), so a retried reserve finds the reservation it already made: the primary
    -- key is the backstop that keeps one reservation per id whatever the idempotency store remembers.
    id         text        PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    saga_id    text        NULL,
    -- NULL only in a tombstone: a cancel that arrived before (or instead of) its reserve. The tombstone makes a
    -- late reserve with that id fail instead of taking stock nobody will ever release.
    sku        text        NULL REFERENCES products (sku),
    quantity   integer     NULL CHECK (quantity > 0),
    status     text        NOT NULL CHECK (status IN ('RESERVED', 'CONFIRMED', 'CANCELLED')),
    version    bigint      NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reservations_tombstone_shape CHECK (
        (sku IS NULL) = (quantity IS NULL) AND (sku IS NOT NULL OR status = 'CANCELLED')
    ),
    -- Every reservation that holds or consumed stock belongs to a saga.
    CONSTRAINT reservations_saga_known CHECK (sku IS NULL OR saga_id IS NOT NULL)
);

CREATE INDEX reservations_sku_status_idx ON reservations (sku, status) WHERE sku IS NOT NULL;
CREATE INDEX reservations_saga_idx ON reservations (saga_id, sku) WHERE status = 'RESERVED';
