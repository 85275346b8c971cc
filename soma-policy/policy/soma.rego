# Soma platform reference authorization policy (Rego v1: OPA 1.x and regorus).
#
# Entry point: data.soma.authz.decision -> {"allow": bool, "reasons": [string]}
# Input schema (shared by the HTTP layer and workers):
#   {subject, tenant, roles, scopes, action, resource {kind, id},
#    request {method, route, request_id}, context}
# The input never carries credentials or raw headers.
#
# Deny by default. A request is allowed only when no reason to deny exists.
#
# Every negated test is a rule (`not known_action`, `not has_role`), never
# a negated call or reference over the input: OPA evaluates the operands
# of `not actions[input.action]` or `not "admin" in input.roles` before
# the negation, so when the field is missing the body fails instead of
# holding, and a request without an action would be allowed. The crate's
# tests hold the policy to real OPA's decisions on malformed inputs too.
#
# Within a body, the test that fails for an allowed request comes first
# (`not has_role` before `known_action`): the order does not change the
# decision, and regorus' VM stops a body at its first failing expression.
package soma.authz

# Action table: which roles may perform an action (any one suffices) and
# which scope the credential must carry.
actions := {
	"conversation.send": {"roles": {"user", "agent", "admin"}, "scope": "conversation:write"},
	"conversation.read": {"roles": {"user", "agent", "admin"}, "scope": "conversation:read"},
	"tool.execute": {"roles": {"agent", "admin"}, "scope": "tool:execute"},
	"memory.write": {"roles": {"user", "agent", "admin"}, "scope": "memory:write"},
	"memory.read_tenant": {"roles": {"admin"}, "scope": "memory:read"},
	"scheduler.create": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"scheduler.read": {"roles": {"user", "operator", "admin"}, "scope": "scheduler:read"},
	"scheduler.update": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"scheduler.delete": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"scheduler.run": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"uploads.write": {"roles": {"user", "agent", "operator", "admin"}, "scope": "uploads:write"},
	"uploads.read": {"roles": {"user", "agent", "operator", "admin"}, "scope": "uploads:read"},
	"notifications.read": {"roles": {"user", "agent", "operator", "admin"}, "scope": "notifications:read"},
	"notifications.ack": {"roles": {"user", "agent", "operator", "admin"}, "scope": "notifications:read"},
	"ops.read": {"roles": {"operator", "admin"}, "scope": "ops:read"},
	"ops.admin": {"roles": {"admin"}, "scope": "ops:admin"},
	"config.read": {"roles": {"operator", "admin"}, "scope": "ops:read"},
	"features.read": {"roles": {"operator", "admin"}, "scope": "ops:read"},
	"somabrain.operate": {"roles": {"operator", "admin"}, "scope": "somabrain:operate"},
}

default allow := false

allow if count(reasons) == 0

# `reasons` is read once. Unification (`=`), not `:=`: regorus' VM does
# not stop a body on an undefined `:=` (see RegoEvaluator::Vm), and the
# crate keeps such policies off the VM.
decision := {"allow": r == [], "reasons": r} if r = sort(reasons)

# What the reasons below test. Each is evaluated once per decision.
known_action if actions[input.action]

valid_subject if {
	is_string(input.subject)
	input.subject != ""
}

valid_tenant if {
	is_string(input.tenant)
	input.tenant != ""
}

has_role if {
	some r in input.roles
	r in actions[input.action].roles
}

has_scope if actions[input.action].scope in input.scopes

admin if "admin" in input.roles

reasons contains "unknown_action" if not known_action

reasons contains "missing_subject" if not valid_subject

reasons contains "missing_tenant" if not valid_tenant

# Tenant isolation: a resource owned by another tenant is never reachable,
# whatever the roles.
reasons contains "tenant_mismatch" if {
	input.context.resource_tenant != input.tenant
	valid_tenant
}

reasons contains "missing_role" if {
	not has_role
	known_action
}

reasons contains "missing_scope" if {
	not has_scope
	known_action
}

# High-risk tools need an administrator, even for agents with the scope.
reasons contains "high_risk_tool_requires_admin" if {
	input.action == "tool.execute"
	input.context.tool_risk == "high"
	not admin
}

# Changing, running or deleting a schedule someone else owns needs an
# administrator.
reasons contains "not_schedule_owner" if {
	input.action in {"scheduler.update", "scheduler.delete", "scheduler.run"}
	is_string(input.context.owner)
	input.context.owner != input.subject
	not admin
}

# An upload or a notification belongs to the subject that made or
# received it (`context.owner`, from the store): no role overrides it.
reasons contains "not_owner" if {
	input.action in {"uploads.read", "notifications.ack"}
	is_string(input.context.owner)
	input.context.owner != input.subject
}

# A conversation belongs to the subject that created it: `context.owner`
# is set from the conversation store by whoever knows it (the gateway
# after its route check, the conversation worker on every turn). No role
# overrides it; without an owner in the input only the route check runs.
reasons contains "not_conversation_owner" if {
	input.action in {"conversation.send", "conversation.read"}
	is_string(input.context.owner)
	input.context.owner != input.subject
}
