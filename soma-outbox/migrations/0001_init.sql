-- soma-outbox schema, version 1.
-- `{schema}` is replaced by the configured schema (a validated, quoted identifier)
-- and `{channel}` by the LISTEN/NOTIFY channel name before this runs.

-- Pending and (with retention) sent messages.
-- Order of delivery is (txid, seq): txid is the producing transaction's 64-bit id,
-- seq orders records inside one transaction. The relay only reads rows whose txid is
-- below the xmin of its snapshot, i.e. rows of transactions that can no longer commit
-- "behind" it (see the crate docs, "Commit order").
CREATE TABLE {schema}.outbox (
    id           uuid PRIMARY KEY,
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    topic        text COLLATE "C" NOT NULL,
    key          text COLLATE "C",
    key_hash     integer NOT NULL CHECK (key_hash >= 0),
    payload      bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    dedupe_key   text COLLATE "C",
    created_at   timestamptz NOT NULL DEFAULT now(),
    available_at timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    replays      integer NOT NULL DEFAULT 0,
    last_error   text,
    errors       jsonb NOT NULL DEFAULT '[]'::jsonb,
    sent_at      timestamptz
);

CREATE UNIQUE INDEX outbox_dedupe_key ON {schema}.outbox (dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX outbox_pending_order ON {schema}.outbox (txid, seq) WHERE sent_at IS NULL;
-- Rows that failed at least once: the only ones that can block their key
-- (available_at in the future). Small, so the per-row "is an earlier record
-- of my key waiting for a retry?" probe stays cheap.
CREATE INDEX outbox_retrying ON {schema}.outbox (topic, key, txid, seq)
    WHERE sent_at IS NULL AND key IS NOT NULL AND attempts > 0;
CREATE INDEX outbox_pending_key ON {schema}.outbox (topic, key)
    WHERE sent_at IS NULL AND key IS NOT NULL;
CREATE INDEX outbox_sent_at ON {schema}.outbox (sent_at) WHERE sent_at IS NOT NULL;

-- Messages that exhausted their attempts or were rejected by the sink.
CREATE TABLE {schema}.dead_letters (
    id          uuid PRIMARY KEY,
    topic       text NOT NULL,
    key         text,
    key_hash    integer NOT NULL,
    payload     bytea NOT NULL,
    headers     jsonb NOT NULL,
    dedupe_key  text,
    created_at  timestamptz NOT NULL,
    attempts    integer NOT NULL,
    replays     integer NOT NULL,
    last_error  text NOT NULL,
    errors      jsonb NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_dead_at ON {schema}.dead_letters (dead_at);

-- Consumer-side inbox: one row per (consumer, message id) processed.
CREATE TABLE {schema}.inbox (
    consumer     text NOT NULL,
    message_id   uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_processed_at ON {schema}.inbox (processed_at);

-- Settings every relay of this schema must agree on.
CREATE TABLE {schema}.relay_settings (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shards     integer NOT NULL CHECK (shards > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Wake relays when a transaction that inserted messages commits
-- (NOTIFY is delivered at commit, once per transaction and channel).
CREATE FUNCTION {schema}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON {schema}.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.outbox_notify();
