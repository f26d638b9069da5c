# Model access by role and team.
#
# A role grants models (govgate_config.roles.<role>.models, "*" for all); a
# team may narrow that further (govgate_config.teams.<team>.models). A
# principal may use a model when one of its roles grants it AND its team,
# if the team lists models, lists it too.
package govgate

import rego.v1

# ---------------------------------------------------------------- roles

# Roles of the principal that the policy knows; unknown names are ignored.
known_roles contains role if {
	is_array(input.principal.roles)
	some role in input.principal.roles
	is_string(role)
	is_object(config.roles[role])
}

# The models a role lists ([] when it lists none).
role_models(role) := as_list(object.get(config.roles[role], "models", null))

# A role grants a model when its model list holds the model or "*".
role_grants(role, _) if "*" in role_models(role)

role_grants(role, model_name) if model_name in role_models(role)

# The principal's roles that grant the given model.
granting_roles(model_name) := {role |
	some role in known_roles
	role_grants(role, model_name)
}

# The settings of each of the principal's known roles, over the defaults
# (what role_setting gives, worked out once per decision).
known_role_settings := {role: object.union(defaults, config.roles[role]) | some role in known_roles}

# The principal's roles that grant the requested model (granting_roles of
# it), as a rule, so one decision works it out once for all who ask. The
# load-time check (checks.rego) makes every role's `models` a list.
granting := roles if {
	wanted = {"*", requested_model}
	roles = {role |
		some role in known_roles
		some listed in object.get(config.roles[role], "models", [])
		listed in wanted
	}
}

# The principal may use the requested model through at least one role.
model_permitted if count(granting) > 0

access_denials contains {"code": "unknown_role", "message": msg} if {
	count(known_roles) == 0
	msg = sprintf("principal '%s' has no role this policy knows", [principal_label])
}

access_denials contains {"code": "model_not_allowed", "message": msg} if {
	count(known_roles) > 0
	not model_permitted
	msg = sprintf(
		"no role of principal '%s' (%s) may use model '%s'",
		[principal_label, concat(", ", sort(known_roles)), model_label],
	)
}

# ---------------------------------------------------------------- teams

# The principal's team's settings ({} without a team or an entry for it).
team_settings := settings if {
	settings = object.get(config, ["teams", principal_team], null)
	is_object(settings)
} else := {}

# A model the team lets its members use: any, when the team's entry has no
# (or a null) `models` key. The load-time check (checks.rego) makes a
# restricting team's `models` a list. (Only a list is walked: regorus's
# interpreter stops with an error on `some … in null`, where OPA and the
# compiled VM find nothing, and regorus asks every definition of a
# function, so a team with `"models": null` failed every decision.)
team_allows(_) if object.get(team_settings, "models", null) == null

team_allows(model_name) if {
	models = team_settings.models
	is_array(models)
	some listed in models
	listed in {"*", model_name}
}

access_denials contains {"code": "team_model_not_allowed", "message": msg} if {
	requested_model
	not team_allows(requested_model)
	msg = sprintf("team '%s' of principal '%s' may not use model '%s'", [principal_team, principal_label, requested_model])
}

# ---------------------------------------------------------------- model list

# Names of the models in input.models that the principal may use
# (GET /v1/models lists only these). Hours and purposes do not hide a model:
# the list says what a principal may ask for, a request says whether now.
visible_models contains name if {
	is_array(input.models)
	some model in input.models
	name = model.name
	is_string(name)
	count(granting_roles(name)) > 0
	team_allows(name)
}
