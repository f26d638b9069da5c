# Unit tests for access.rego: roles grant models, teams narrow them.
package govgate.access_test

import rego.v1

import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.decide_as

import data.govgate_test.fixtures

# ---------------------------------------------------------------- roles

test_admin_allowed_any_model if {
	d := decide_as(["admin"], "big", 100)
	d.allow
	d.reasons == []
}

test_analyst_allowed_granted_model if {
	d := decide_as(["analyst"], "govgate-tiny", 100)
	d.allow
}

test_analyst_denied_model_not_granted if {
	d := decide_as(["analyst"], "big", 100)
	not d.allow
	codes(d) == {"model_not_allowed"}
}

test_denial_message_names_principal_roles_and_model if {
	d := decide_as(["analyst"], "big", 100)
	d.reasons[0].message == "no role of principal 'u-1' (analyst) may use model 'big'"
}

test_viewer_denied_every_model if {
	d := decide_as(["viewer"], "govgate-tiny", 100)
	codes(d) == {"model_not_allowed"}
}

test_unknown_role_denied if {
	d := decide_as(["stranger"], "govgate-tiny", 100)
	codes(d) == {"unknown_role"}
}

test_no_roles_denied_as_unknown_role if {
	d := decide_as([], "govgate-tiny", 100)
	codes(d) == {"unknown_role"}
}

test_roles_not_a_list_denied_as_unknown_role if {
	d := decide({"principal": {"roles": "admin"}})
	codes(d) == {"unknown_role"}
}

test_role_names_that_are_not_strings_ignored if {
	d := decide({"principal": {"roles": [1, {"admin": true}, null]}})
	codes(d) == {"unknown_role"}
}

test_unknown_role_ignored_beside_known_role if {
	d := decide_as(["stranger", "analyst"], "govgate-tiny", 100)
	d.allow
}

test_missing_principal_denied_with_reason if {
	d := data.govgate.decision with input as object.remove(data.govgate_test.fixtures.base_input, ["principal"])
		with data.govgate_config as config
	codes(d) == {"unknown_role"}
	d.reasons[0].message == "principal '(unknown)' has no role this policy knows"
}

test_missing_model_denied_with_reason if {
	d := data.govgate.decision with input as object.remove(data.govgate_test.fixtures.base_input, ["model"])
		with data.govgate_config as config
	codes(d) == {"model_not_allowed"}
	contains(d.reasons[0].message, "'(unknown)'")
}

# ---------------------------------------------------------------- teams

test_team_without_entry_does_not_restrict if {
	d := decide_as(["admin"], "big", 100)
	d.allow
}

test_team_entry_without_models_does_not_restrict if {
	d := decide({
		"principal": {"roles": ["admin"], "team": "open"},
		"request": {"model": "big"}, "model": {"name": "big"},
	})
	d.allow
}

# (regorus's interpreter stopped with an error here: `some … in null`.)
test_team_with_null_models_does_not_restrict if {
	d := data.govgate.decision with input as fixtures.input_with({
		"principal": {"roles": ["admin"], "team": "open"},
		"request": {"model": "big"}, "model": {"name": "big"},
	})
		with data.govgate_config as object.union(config, {"teams": {"open": {"models": null}}})
	d.allow
	count(fixtures.config_problems_with({"teams": {"open": {"models": null}}})) == 0
}

test_team_with_star_does_not_restrict if {
	d := decide({
		"principal": {"roles": ["admin"], "team": "research"},
		"request": {"model": "big"}, "model": {"name": "big"},
	})
	d.allow
}

test_team_allows_listed_model if {
	d := decide({"principal": {"roles": ["admin"], "team": "support"}})
	d.allow
}

test_team_denies_model_its_list_lacks_even_to_admin if {
	d := decide({
		"principal": {"roles": ["admin"], "team": "support"},
		"request": {"model": "big"}, "model": {"name": "big"},
	})
	not d.allow
	codes(d) == {"team_model_not_allowed"}
	d.reasons[0].message == "team 'support' of principal 'u-1' may not use model 'big'"
}

test_team_and_role_denials_both_reported if {
	d := decide({
		"principal": {"roles": ["analyst"], "team": "support"},
		"request": {"model": "big"}, "model": {"name": "big"},
	})
	codes(d) == {"model_not_allowed", "team_model_not_allowed"}
}

test_team_models_not_a_list_is_refused_at_load if {
	count(data.govgate_test.fixtures.config_problems_with({"teams": {"odd": {"models": "govgate-tiny"}}})) == 1
}

test_principal_without_team_is_not_restricted if {
	d := decide({"principal": {"roles": ["admin"], "team": null}, "request": {"model": "big"}, "model": {"name": "big"}})
	d.allow
}

# ---------------------------------------------------------------- model list

models_input(roles, team) := {
	"principal": {"id": "u-1", "team": team, "roles": roles, "key_id": "k-1"},
	"models": [
		{"name": "govgate-tiny", "family": "llama", "context_length": 256, "tags": []},
		{"name": "big", "family": "llama", "context_length": 4096, "tags": []},
		{"name": "night", "family": "llama", "context_length": 4096, "tags": ["restricted"]},
	],
}

visible(roles, team) := names if {
	names := data.govgate.visible_models with input as models_input(roles, team)
		with data.govgate_config as config
}

test_visible_models_for_admin_are_all if {
	visible(["admin"], "t-1") == {"govgate-tiny", "big", "night"}
}

test_visible_models_for_analyst_are_granted_ones if {
	visible(["analyst"], "t-1") == {"govgate-tiny"}
}

test_visible_models_for_unknown_role_are_none if {
	visible(["stranger"], "t-1") == set()
}

test_visible_models_narrowed_by_team if {
	visible(["admin"], "support") == {"govgate-tiny"}
}

test_visible_models_ignore_hours_and_purposes if {
	# "night" is closed at noon and needs a purpose; it is still listed
	names := data.govgate.visible_models with input as object.union(models_input(["admin"], null), {"time": {"hour_utc": 12}})
		with data.govgate_config as config
	"night" in names
}

test_visible_models_without_a_model_list_are_none if {
	names := data.govgate.visible_models with input as {"principal": {"roles": ["admin"]}, "models": "all"}
		with data.govgate_config as config
	names == set()
}
