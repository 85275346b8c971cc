-- Memories: one row per (tenant, namespace, universe, key); writing the same
-- key again overwrites it. `seq` orders writes (working memory is the newest
-- `wm_capacity` rows of a tenant and namespace).
CREATE SEQUENCE {schema}.memory_seq;

CREATE TABLE {schema}.memories (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    namespace   text NOT NULL,
    universe    text NOT NULL,
    key         text NOT NULL,
    payload     jsonb NOT NULL,
    search_text text NOT NULL,
    tsv         tsvector GENERATED ALWAYS AS (to_tsvector('english', search_text)) STORED,
    coordinate  float8[] NOT NULL,
    expires_at  timestamptz,
    seq         bigint NOT NULL DEFAULT nextval('{schema}.memory_seq'),
    written_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, namespace, universe, key)
);

CREATE INDEX memories_scope_seq ON {schema}.memories (tenant, namespace, seq DESC);
CREATE INDEX memories_tsv ON {schema}.memories USING gin (tsv);
CREATE INDEX memories_trgm ON {schema}.memories USING gin (search_text {trgm}.gin_trgm_ops);
CREATE INDEX memories_expiry ON {schema}.memories (expires_at) WHERE expires_at IS NOT NULL;

-- Context feedback (the platform's reward): stored as received, never
-- used to change weights.
CREATE TABLE {schema}.feedback (
    id            bigserial PRIMARY KEY,
    tenant        text NOT NULL,
    session_id    text NOT NULL,
    query         text NOT NULL,
    prompt        text NOT NULL,
    response_text text NOT NULL,
    utility       float8 NOT NULL,
    reward        float8,
    metadata      jsonb,
    received_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX feedback_tenant ON {schema}.feedback (tenant);
