-- Each tenant's feedback count, kept as feedback is stored: `history_len`
-- in the feedback answer and the adaptation state reads one row instead of
-- counting the tenant's feedback (a count that grew with every turn).
CREATE TABLE {schema}.feedback_totals (
    tenant text PRIMARY KEY,
    events bigint NOT NULL
);

INSERT INTO {schema}.feedback_totals (tenant, events)
SELECT tenant, count(*) FROM {schema}.feedback GROUP BY tenant;
