-- Recall across every namespace of a tenant (context evaluate) reads the
-- tenant's newest memories in order, as a scoped recall reads
-- memories_scope_seq: bounded work, no sort of the tenant's rows.
CREATE INDEX memories_tenant_seq ON {schema}.memories (tenant, seq DESC);
