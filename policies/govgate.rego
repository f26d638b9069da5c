# METADATA
# title: govgate usage policy
# description: |
#   Decides whether a principal may send a request to a model, and under which
#   obligations. Who may do what lives in data.govgate_config (data.json), so an
#   operator changes access by editing data, not this module.
#
#   Entry points read by the gateway:
#     data.govgate.decision        {allow, reasons, obligations}
#     data.govgate.visible_models  names of input.models the principal may use
#
#   A denial is never inferred from a missing reason: allow must be proven, and
#   every denial carries at least one reason.
package govgate

import rego.v1

config := data.govgate_config

# The decision the gateway enforces, in the shape of the policy contract.
decision := {
	"allow": allow,
	"reasons": reasons,
	"obligations": obligations,
}

# ---------------------------------------------------------------- allow

default allow := false

# A request is allowed when a role grants the model and nothing denies it.
allow if {
	model_permitted
	count(denials) == 0
}

# ---------------------------------------------------------------- roles

# Roles of the principal that the policy knows; unknown names are ignored.
# The type check keeps OPA and regorus alike: regorus raises an error when
# `some .. in` meets a non-collection, OPA is undefined.
known_roles contains role if {
	is_array(input.principal.roles)
	some role in input.principal.roles
	config.roles[role]
}

# A role grants a model when its model list holds the model or "*".
role_grants(role, _) if "*" in config.roles[role].models

role_grants(role, model_name) if model_name in config.roles[role].models

# The principal's roles that grant the given model.
granting_roles(model_name) := {role |
	some role in known_roles
	role_grants(role, model_name)
}

# The principal may use the requested model through at least one role.
model_permitted if count(granting_roles(input.model.name)) > 0

# ---------------------------------------------------------------- obligations

obligations := {
	"max_tokens": granted_max_tokens,
	"prompt_logging": prompt_logging,
}

# A role's token cap, or the default cap when the role sets none.
role_max_tokens(role) := object.get(config.roles[role], "max_tokens", config.defaults.max_tokens)

# The most generous cap among the roles that grant the model: holding one
# more role should never take tokens away.
token_cap := max({role_max_tokens(role) | some role in granting_roles(input.model.name)})

# The request's max_tokens, clamped to the cap. 0 when no role grants the
# model (the request is denied then and the value is never used).
default granted_max_tokens := 0

granted_max_tokens := min({input.request.max_tokens, token_cap})

# A role's prompt logging level, or the default when the role sets none.
role_prompt_logging(role) := object.get(config.roles[role], "prompt_logging", config.defaults.prompt_logging)

# Logging levels of all the principal's known roles (not only those granting
# the model) so that a denied request is logged as the person's roles ask.
logging_levels contains level if {
	some role in known_roles
	level := role_prompt_logging(role)
}

# The most private level wins: a role set to redact or hash prompts exists
# to protect what its holders type, and a second role must not undo that.
prompt_logging := "hash" if {
	"hash" in logging_levels
} else := "redacted" if {
	"redacted" in logging_levels
} else := config.defaults.prompt_logging

# ---------------------------------------------------------------- reasons

# The reasons returned to the client: empty when allowed, never empty when
# denied (a denial no rule explains still says so).
reasons := [] if {
	allow
} else := sorted_denials if {
	count(denials) > 0
} else := [{"code": "denied", "message": "no policy rule allows this request"}]

sorted_denials := [denial | some denial in denials]

denials contains {"code": "unknown_role", "message": msg} if {
	count(known_roles) == 0
	msg := sprintf("principal '%s' has no role this policy knows", [principal_label])
}

denials contains {"code": "model_not_allowed", "message": msg} if {
	count(known_roles) > 0
	not model_permitted
	msg := sprintf(
		"no role of principal '%s' (%s) may use model '%s'",
		[principal_label, concat(", ", sort(known_roles)), model_label],
	)
}

# Names for messages that exist even when the input lacks them, so that a
# malformed input still gets its reason.
principal_label := input.principal.id if {
	is_string(input.principal.id)
} else := "(unknown)"

model_label := input.model.name if {
	is_string(input.model.name)
} else := "(unknown)"

# ---------------------------------------------------------------- model list

# Names of the models in input.models that the principal may use
# (GET /v1/models lists only these).
visible_models contains name if {
	is_array(input.models)
	some model in input.models
	name := model.name
	count(granting_roles(name)) > 0
}
