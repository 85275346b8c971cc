-- soma-outbox schema, version 2: dead letters remember their place in their
-- key's order, so that (with `dead_letter_order = "block_key"`) later messages
-- of the key wait behind them and a requeue puts them back where they were.
ALTER TABLE {schema}.dead_letters ADD COLUMN txid xid8;
ALTER TABLE {schema}.dead_letters ADD COLUMN seq bigint;
-- The claim's "is an earlier message of my key dead-lettered?" probe.
CREATE INDEX dead_letters_key ON {schema}.dead_letters (topic, key, txid, seq)
    WHERE key IS NOT NULL;
