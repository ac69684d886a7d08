-- The relay claims PENDING rows in seq order and filters on next_attempt_at: an index on seq alone lets it walk
-- the pending rows in order and stop after one batch, where (next_attempt_at, seq) made it sort every pending row
-- of a backlog on each claim.
DROP INDEX outbox_pending_idx;
CREATE INDEX outbox_pending_seq_idx ON outbox (seq) WHERE status = 'PENDING';
