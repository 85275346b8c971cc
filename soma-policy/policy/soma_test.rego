# Tests for the reference policy. Run with real OPA (`opa test policy/`) or
# through the crate's test suite, which evaluates every `test_*` rule with
# both regorus and OPA's Go evaluator.
package soma.authz_test

import data.soma.authz

base := {
	"subject": "user-1",
	"tenant": "t1",
	"roles": ["user"],
	"scopes": ["conversation:write", "memory:write", "scheduler:read"],
	"action": "conversation.send",
	"resource": {"kind": "session", "id": "s1"},
	"request": {"method": "POST", "route": "/v1/sessions/{id}/messages", "request_id": "r1"},
	"context": {},
}

test_user_can_send if authz.allow with input as base

test_reading_a_conversation_needs_the_read_scope if {
	authz.allow with input as object.union(base, {"action": "conversation.read", "scopes": ["conversation:read"]})
	d := authz.decision with input as object.union(base, {"action": "conversation.read"})
	d.reasons == ["missing_scope"]
}

test_user_can_write_memory if authz.allow with input as object.union(base, {"action": "memory.write"})

test_unknown_action_denied if {
	d := authz.decision with input as object.union(base, {"action": "conversation.delete_everything"})
	d.allow == false
	"unknown_action" in d.reasons
}

test_missing_scope_denied if {
	d := authz.decision with input as object.union(base, {"scopes": []})
	d.allow == false
	d.reasons == ["missing_scope"]
}

test_missing_role_denied if {
	d := authz.decision with input as object.union(base, {"roles": ["viewer"]})
	d.reasons == ["missing_role"]
}

test_cross_tenant_denied if {
	d := authz.decision with input as object.union(base, {"context": {"resource_tenant": "t2"}})
	d.allow == false
	d.reasons == ["tenant_mismatch"]
}

test_same_tenant_resource_allowed if authz.allow with input as object.union(base, {"context": {"resource_tenant": "t1"}})

test_empty_tenant_denied if {
	d := authz.decision with input as object.union(base, {"tenant": ""})
	"missing_tenant" in d.reasons
}

test_empty_subject_denied if {
	d := authz.decision with input as object.union(base, {"subject": ""})
	"missing_subject" in d.reasons
}

test_user_cannot_execute_tools if {
	d := authz.decision with input as object.union(base, {"action": "tool.execute", "scopes": ["tool:execute"]})
	d.reasons == ["missing_role"]
}

test_agent_executes_low_risk_tool if {
	authz.allow with input as object.union(base, {
		"action": "tool.execute", "roles": ["agent"], "scopes": ["tool:execute"],
		"context": {"tool_risk": "low"},
	})
}

test_agent_cannot_execute_high_risk_tool if {
	d := authz.decision with input as object.union(base, {
		"action": "tool.execute", "roles": ["agent"], "scopes": ["tool:execute"],
		"context": {"tool_risk": "high"},
	})
	d.reasons == ["high_risk_tool_requires_admin"]
}

test_admin_executes_high_risk_tool if {
	authz.allow with input as object.union(base, {
		"action": "tool.execute", "roles": ["admin"], "scopes": ["tool:execute"],
		"context": {"tool_risk": "high"},
	})
}

test_user_reads_schedules if authz.allow with input as object.union(base, {"action": "scheduler.read"})

test_user_cannot_create_schedules if {
	d := authz.decision with input as object.union(base, {"action": "scheduler.create", "scopes": ["scheduler:write"]})
	d.reasons == ["missing_role"]
}

test_operator_crud_own_schedule if {
	every action in ["scheduler.create", "scheduler.update", "scheduler.delete"] {
		authz.allow with input as object.union(base, {
			"action": action, "roles": ["operator"], "scopes": ["scheduler:write"],
			"context": {"owner": "user-1"},
		})
	}
}

test_operator_cannot_run_foreign_schedule_but_admin_can if {
	d := authz.decision with input as object.union(base, {
		"action": "scheduler.run", "roles": ["operator"], "scopes": ["scheduler:write"],
		"context": {"owner": "someone-else"},
	})
	d.reasons == ["not_schedule_owner"]
	authz.allow with input as object.union(base, {
		"action": "scheduler.run", "roles": ["admin"], "scopes": ["scheduler:write"],
		"context": {"owner": "someone-else"},
	})
}

test_user_cannot_run_schedules if {
	d := authz.decision with input as object.union(base, {"action": "scheduler.run", "scopes": ["scheduler:write"]})
	d.reasons == ["missing_role"]
}

test_user_uploads_and_reads_own_upload if {
	authz.allow with input as object.union(base, {"action": "uploads.write", "scopes": ["uploads:write"]})
	authz.allow with input as object.union(base, {
		"action": "uploads.read", "scopes": ["uploads:read"],
		"context": {"owner": "user-1", "resource_tenant": "t1"},
	})
}

test_uploads_need_their_scopes if {
	d := authz.decision with input as object.union(base, {"action": "uploads.write"})
	d.reasons == ["missing_scope"]
	e := authz.decision with input as object.union(base, {"action": "uploads.read", "scopes": ["uploads:write"]})
	e.reasons == ["missing_scope"]
}

test_nobody_reads_another_subjects_upload if {
	d := authz.decision with input as object.union(base, {
		"action": "uploads.read", "roles": ["admin"], "scopes": ["uploads:read"],
		"context": {"owner": "someone-else"},
	})
	d.reasons == ["not_owner"]
}

test_notifications_are_read_and_acknowledged_by_their_owner if {
	authz.allow with input as object.union(base, {"action": "notifications.read", "scopes": ["notifications:read"]})
	authz.allow with input as object.union(base, {
		"action": "notifications.ack", "scopes": ["notifications:read"],
		"context": {"owner": "user-1"},
	})
	d := authz.decision with input as object.union(base, {
		"action": "notifications.ack", "scopes": ["notifications:read"],
		"context": {"owner": "someone-else"},
	})
	d.reasons == ["not_owner"]
	e := authz.decision with input as object.union(base, {"action": "notifications.read"})
	e.reasons == ["missing_scope"]
}

test_operator_cannot_delete_foreign_schedule if {
	d := authz.decision with input as object.union(base, {
		"action": "scheduler.delete", "roles": ["operator"], "scopes": ["scheduler:write"],
		"context": {"owner": "someone-else"},
	})
	d.reasons == ["not_schedule_owner"]
}

test_ops_admin_needs_admin_and_scope if {
	authz.allow with input as object.union(base, {"action": "ops.admin", "roles": ["admin"], "scopes": ["ops:admin"]})
	not authz.allow with input as object.union(base, {"action": "ops.admin", "roles": ["operator"], "scopes": ["ops:admin"]})
	not authz.allow with input as object.union(base, {"action": "ops.admin", "roles": ["admin"], "scopes": ["ops:read"]})
}

test_operator_reads_operations if {
	authz.allow with input as object.union(base, {"action": "ops.read", "roles": ["operator"], "scopes": ["ops:read"]})
}

test_empty_input_denied if {
	d := authz.decision with input as {}
	d.allow == false
}

# A missing field denies under OPA as under regorus. OPA evaluates the
# operands of a negated call or reference before the negation, so
# `not actions[input.action]` fails, rather than holds, when the action
# is missing; the policy negates rules (`not known_action`) instead.
test_missing_action_denied if {
	d := authz.decision with input as object.remove(base, ["action"])
	d.allow == false
	d.reasons == ["unknown_action"]
}

test_missing_roles_denied if {
	d := authz.decision with input as object.remove(base, ["roles"])
	d.reasons == ["missing_role"]
}

test_missing_scopes_denied if {
	d := authz.decision with input as object.remove(base, ["scopes"])
	d.reasons == ["missing_scope"]
}

test_missing_subject_and_tenant_denied if {
	d := authz.decision with input as object.remove(base, ["subject", "tenant"])
	d.reasons == ["missing_subject", "missing_tenant"]
}

test_high_risk_tool_without_roles_needs_admin if {
	d := authz.decision with input as object.remove(
		object.union(base, {"action": "tool.execute", "scopes": ["tool:execute"], "context": {"tool_risk": "high"}}),
		["roles"],
	)
	d.reasons == ["high_risk_tool_requires_admin", "missing_role"]
}

test_owner_sends_and_reads_own_conversation if {
	authz.allow with input as object.union(base, {"context": {"owner": "user-1", "resource_tenant": "t1"}})
	authz.allow with input as object.union(base, {
		"action": "conversation.read", "scopes": ["conversation:read"],
		"context": {"owner": "user-1"},
	})
}

test_another_subject_cannot_use_a_conversation if {
	d := authz.decision with input as object.union(base, {"context": {"owner": "user-2"}})
	d.reasons == ["not_conversation_owner"]
	r := authz.decision with input as object.union(base, {
		"action": "conversation.read", "scopes": ["conversation:read"],
		"context": {"owner": "user-2"},
	})
	r.reasons == ["not_conversation_owner"]
}

test_an_admin_cannot_use_another_subjects_conversation if {
	d := authz.decision with input as object.union(base, {"roles": ["admin"], "context": {"owner": "user-2"}})
	d.reasons == ["not_conversation_owner"]
}

test_another_tenants_conversation_is_out_of_reach if {
	d := authz.decision with input as object.union(base, {"context": {"owner": "user-1", "resource_tenant": "t2"}})
	d.reasons == ["tenant_mismatch"]
}

test_tenant_wide_memory_recall_is_for_admins_with_the_scope if {
	authz.allow with input as object.union(base, {"action": "memory.read_tenant", "roles": ["admin"], "scopes": ["memory:read"]})
	d := authz.decision with input as object.union(base, {"action": "memory.read_tenant", "scopes": ["memory:read"]})
	d.reasons == ["missing_role"]
}

test_operators_read_the_runtime_config_and_features if {
	every action in {"config.read", "features.read"} {
		authz.allow with input as object.union(base, {"action": action, "roles": ["operator"], "scopes": ["ops:read"]})
		authz.allow with input as object.union(base, {"action": action, "roles": ["admin"], "scopes": ["ops:read"]})
	}
}

test_users_cannot_read_the_runtime_config_or_features if {
	every action in {"config.read", "features.read"} {
		d := authz.decision with input as object.union(base, {"action": action, "scopes": ["ops:read"]})
		d.reasons == ["missing_role"]
	}
}

test_somabrain_operate_needs_an_operator_with_the_scope if {
	authz.allow with input as object.union(base, {"action": "somabrain.operate", "roles": ["operator"], "scopes": ["somabrain:operate"]})
	d := authz.decision with input as object.union(base, {"action": "somabrain.operate", "roles": ["operator"], "scopes": ["ops:read"]})
	d.reasons == ["missing_scope"]
	u := authz.decision with input as object.union(base, {"action": "somabrain.operate", "scopes": ["somabrain:operate"]})
	u.reasons == ["missing_role"]
}

test_dlq_administration_is_for_admins_only if {
	authz.allow with input as object.union(base, {"action": "ops.admin", "roles": ["admin"], "scopes": ["ops:admin"]})
	d := authz.decision with input as object.union(base, {"action": "ops.admin", "roles": ["operator"], "scopes": ["ops:admin", "ops:read"]})
	d.reasons == ["missing_role"]
}
