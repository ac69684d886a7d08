-- Orders of the checkout demo. An order is created PENDING by its checkout saga and ends APPROVED (the payment
-- was captured) or CANCELLED (the saga compensated).
CREATE TABLE orders (
    id             uuid PRIMARY KEY,
    customer_email text        NOT NULL CHECK (length(customer_email) BETWEEN 3 AND 254),
    sku            text        NOT NULL CHECK (length(sku) BETWEEN 1 AND 64),
    quantity       integer     NOT NULL CHECK (quantity > 0),
    amount_cents   bigint      NOT NULL CHECK (amount_cents > 0),
    currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status         text        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'APPROVED', 'CANCELLED')),
    -- Optimistic locking: every change bumps it and checks the value it read.
    version        bigint      NOT NULL DEFAULT 1,
    -- The Saga resource that drives this order (namespace/name).
    saga           text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX orders_status_idx ON orders (status, created_at);
