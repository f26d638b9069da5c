# Unit tests for govgate.rego. They run under `opa test policies/` and, without
# an opa binary, under regorus via tests/test_rego_units.py.
#
# Most tests replace data.govgate_config with the fixture below so that an
# operator editing data.json cannot break them; the shipped_config tests check
# the data.json that ships.
package govgate_test

import rego.v1

import data.govgate

config := {
	"defaults": {"max_tokens": 128, "prompt_logging": "full"},
	"roles": {
		"admin": {"models": ["*"], "max_tokens": 4096},
		"analyst": {"models": ["govgate-tiny"], "max_tokens": 256},
		"viewer": {"models": []},
		"intern": {"models": ["govgate-tiny"]},
		"counsel": {"models": ["govgate-tiny", "big"], "max_tokens": 512, "prompt_logging": "hash"},
		"hr": {"models": [], "prompt_logging": "redacted"},
		"translator": {"models": ["big"], "max_tokens": 2048},
	},
}

# A chat request by a principal holding `roles` for `model`.
request_input(roles, model, max_tokens) := {
	"principal": {"id": "u-1", "team": "t-1", "roles": roles, "key_id": "k-1"},
	"request": {
		"endpoint": "chat.completions",
		"model": model,
		"messages": [{"role": "user", "content": "hi"}],
		"text": "hi",
		"max_tokens": max_tokens,
		"stream": false,
		"purpose": null,
	},
	"model": {"name": model, "family": "llama", "context_length": 256, "tags": []},
	"time": {"now_ns": 1700000000000000000, "hour_utc": 12, "weekday": 2},
}

decide(roles, model, max_tokens) := d if {
	d := govgate.decision with input as request_input(roles, model, max_tokens)
		with data.govgate_config as config
}

reason_codes(d) := {r.code | some r in d.reasons}

test_admin_allowed_any_model if {
	d := decide(["admin"], "big", 100)
	d.allow
	d.reasons == []
}

test_analyst_allowed_granted_model if {
	d := decide(["analyst"], "govgate-tiny", 100)
	d.allow
	d.reasons == []
}

test_analyst_denied_model_not_granted if {
	d := decide(["analyst"], "big", 100)
	not d.allow
	reason_codes(d) == {"model_not_allowed"}
}

test_denial_message_names_principal_roles_and_model if {
	d := decide(["analyst"], "big", 100)
	d.reasons[0].message == "no role of principal 'u-1' (analyst) may use model 'big'"
}

test_viewer_denied_every_model if {
	d := decide(["viewer"], "govgate-tiny", 100)
	not d.allow
	reason_codes(d) == {"model_not_allowed"}
}

test_unknown_role_denied if {
	d := decide(["stranger"], "govgate-tiny", 100)
	not d.allow
	reason_codes(d) == {"unknown_role"}
}

test_no_roles_denied_as_unknown_role if {
	d := decide([], "govgate-tiny", 100)
	not d.allow
	reason_codes(d) == {"unknown_role"}
}

test_roles_not_a_list_denied_as_unknown_role if {
	d := decide("admin", "govgate-tiny", 100)
	not d.allow
	reason_codes(d) == {"unknown_role"}
}

test_unknown_role_ignored_beside_known_role if {
	d := decide(["stranger", "analyst"], "govgate-tiny", 100)
	d.allow
}

test_missing_principal_denied_with_reason if {
	d := govgate.decision with input as object.remove(request_input(["admin"], "big", 1), ["principal"])
		with data.govgate_config as config
	not d.allow
	reason_codes(d) == {"unknown_role"}
}

test_missing_model_denied_with_reason if {
	d := govgate.decision with input as object.remove(request_input(["analyst"], "big", 1), ["model"])
		with data.govgate_config as config
	not d.allow
	reason_codes(d) == {"model_not_allowed"}
}

test_granted_model_denied_when_another_rule_denies if {
	d := govgate.decision with input as request_input(["admin"], "big", 10)
		with data.govgate_config as config
		with govgate.denials as {{"code": "over_budget", "message": "m"}}
	not d.allow
	d.reasons == [{"code": "over_budget", "message": "m"}]
}

test_denial_without_reason_gets_generic_reason if {
	d := govgate.decision with input as request_input(["admin"], "big", 10)
		with data.govgate_config as config
		with govgate.model_permitted as false
		with govgate.denials as set()
	not d.allow
	reason_codes(d) == {"denied"}
}

test_max_tokens_below_cap_kept if {
	d := decide(["analyst"], "govgate-tiny", 100)
	d.obligations.max_tokens == 100
}

test_max_tokens_above_cap_clamped if {
	d := decide(["analyst"], "govgate-tiny", 1000)
	d.allow
	d.obligations.max_tokens == 256
}

test_role_without_cap_gets_default_cap if {
	d := decide(["intern"], "govgate-tiny", 1000)
	d.obligations.max_tokens == 128
}

test_most_generous_cap_among_granting_roles_applies if {
	d := decide(["analyst", "counsel"], "govgate-tiny", 1000)
	d.obligations.max_tokens == 512
}

test_cap_of_role_not_granting_model_ignored if {
	# translator has the larger cap but may not use govgate-tiny
	d := decide(["translator", "analyst"], "govgate-tiny", 1000)
	d.obligations.max_tokens == 256
}

test_denied_request_gets_zero_max_tokens if {
	d := decide(["viewer"], "govgate-tiny", 1000)
	d.obligations.max_tokens == 0
}

test_prompt_logging_defaults_to_full if {
	d := decide(["analyst"], "govgate-tiny", 10)
	d.obligations.prompt_logging == "full"
}

test_prompt_logging_set_by_role if {
	d := decide(["counsel"], "govgate-tiny", 10)
	d.obligations.prompt_logging == "hash"
}

test_most_private_prompt_logging_among_roles_applies if {
	d := decide(["admin", "hr"], "govgate-tiny", 10)
	d.obligations.prompt_logging == "redacted"
}

test_prompt_logging_default_comes_from_data if {
	d := govgate.decision with input as request_input(["analyst"], "govgate-tiny", 10)
		with data.govgate_config.defaults.prompt_logging as "redacted"
		with data.govgate_config.roles as config.roles
	d.obligations.prompt_logging == "redacted"
}

test_decision_has_contract_shape if {
	d := decide(["analyst"], "govgate-tiny", 10)
	object.keys(d) == {"allow", "reasons", "obligations"}
	object.keys(d.obligations) == {"max_tokens", "prompt_logging"}
}

models_input(roles) := {
	"principal": {"id": "u-1", "team": "t-1", "roles": roles, "key_id": "k-1"},
	"models": [
		{"name": "govgate-tiny", "family": "llama", "context_length": 256, "tags": []},
		{"name": "big", "family": "llama", "context_length": 4096, "tags": []},
	],
}

test_visible_models_for_admin_are_all if {
	names := govgate.visible_models with input as models_input(["admin"])
		with data.govgate_config as config
	names == {"govgate-tiny", "big"}
}

test_visible_models_for_analyst_are_granted_ones if {
	names := govgate.visible_models with input as models_input(["analyst"])
		with data.govgate_config as config
	names == {"govgate-tiny"}
}

test_visible_models_for_unknown_role_are_none if {
	names := govgate.visible_models with input as models_input(["stranger"])
		with data.govgate_config as config
	names == set()
}

test_shipped_config_prompt_logging_levels_are_known if {
	levels := {level |
		some role in data.govgate_config.roles
		level := object.get(role, "prompt_logging", data.govgate_config.defaults.prompt_logging)
	}
	every level in levels {
		level in {"full", "redacted", "hash"}
	}
}

test_shipped_config_caps_are_positive_integers if {
	caps := [cap |
		some role in data.govgate_config.roles
		cap := object.get(role, "max_tokens", data.govgate_config.defaults.max_tokens)
	]
	every cap in caps {
		is_number(cap)
		cap == round(cap)
		cap > 0
	}
}

test_shipped_config_analyst_limited_to_tiny_model if {
	d := govgate.decision with input as request_input(["analyst"], "govgate-tiny", 1000)
	d.allow
	d.obligations.max_tokens == 256
	e := govgate.decision with input as request_input(["analyst"], "other", 10)
	not e.allow
}
