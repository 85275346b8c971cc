# Soma platform reference authorization policy (Rego v1: OPA 1.x and regorus).
#
# Entry point: data.soma.authz.decision -> {"allow": bool, "reasons": [string]}
# Input schema (shared by the HTTP layer and workers):
#   {subject, tenant, roles, scopes, action, resource {kind, id},
#    request {method, route, request_id}, context}
# The input never carries credentials or raw headers.
#
# Deny by default. A request is allowed only when no reason to deny exists.
package soma.authz

# Action table: which roles may perform an action (any one suffices) and
# which scope the credential must carry.
actions := {
	"conversation.send": {"roles": {"user", "agent", "admin"}, "scope": "conversation:write"},
	"conversation.read": {"roles": {"user", "agent", "admin"}, "scope": "conversation:read"},
	"tool.execute": {"roles": {"agent", "admin"}, "scope": "tool:execute"},
	"memory.write": {"roles": {"user", "agent", "admin"}, "scope": "memory:write"},
	"scheduler.create": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"scheduler.read": {"roles": {"user", "operator", "admin"}, "scope": "scheduler:read"},
	"scheduler.update": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"scheduler.delete": {"roles": {"operator", "admin"}, "scope": "scheduler:write"},
	"operations.read": {"roles": {"operator", "admin"}, "scope": "ops:read"},
	"operations.admin": {"roles": {"admin"}, "scope": "ops:admin"},
}

default allow := false

allow if count(reasons) == 0

decision := {"allow": allow, "reasons": sort(reasons)}

valid_subject if {
	is_string(input.subject)
	input.subject != ""
}

valid_tenant if {
	is_string(input.tenant)
	input.tenant != ""
}

has_role(allowed) if {
	some r in input.roles
	r in allowed
}

has_scope(s) if s in input.scopes

reasons contains "unknown_action" if not actions[input.action]

reasons contains "missing_subject" if not valid_subject

reasons contains "missing_tenant" if not valid_tenant

# Tenant isolation: a resource owned by another tenant is never reachable,
# whatever the roles.
reasons contains "tenant_mismatch" if {
	valid_tenant
	input.context.resource_tenant != input.tenant
}

# The action table is indexed directly rather than through a body
# assignment (`rule := actions[input.action]`): regorus' Rego VM does not
# stop a body on an undefined assignment, so this form keeps the policy
# correct under both of regorus' evaluators (see RegoEvaluator::Vm).
reasons contains "missing_role" if {
	actions[input.action]
	not has_role(actions[input.action].roles)
}

reasons contains "missing_scope" if {
	actions[input.action]
	not has_scope(actions[input.action].scope)
}

# High-risk tools need an administrator, even for agents with the scope.
reasons contains "high_risk_tool_requires_admin" if {
	input.action == "tool.execute"
	input.context.tool_risk == "high"
	not "admin" in input.roles
}

# Deleting a schedule someone else owns needs an administrator.
reasons contains "not_schedule_owner" if {
	input.action in {"scheduler.update", "scheduler.delete"}
	is_string(input.context.owner)
	input.context.owner != input.subject
	not "admin" in input.roles
}
