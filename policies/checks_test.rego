# Unit tests for checks.rego: malformed input denies with a reason naming
# the field; unusable data is a problem the load-time check names.
package govgate.checks_test

import rego.v1

import data.govgate_test.fixtures.base_input
import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.config_problems_with
import data.govgate_test.fixtures.decide

messages(d) := {r.message | some r in d.reasons}

without(path) := d if {
	d := data.govgate.decision with input as json.remove(base_input, [path])
		with data.govgate_config as config
}

# ---------------------------------------------------------------- input

test_missing_max_tokens_denied if {
	d := without("request/max_tokens")
	d.reasons == [{"code": "invalid_input", "message": "input.request.max_tokens must be a whole number from 1 to 2^53"}]
}

test_max_tokens_of_wrong_type_or_value_denied if {
	every value in ["100", 0, -5, 2.5, null, true] {
		codes(decide({"request": {"max_tokens": value}})) == {"invalid_input"}
	}
}

test_missing_text_denied if {
	messages(without("request/text")) == {"input.request.text must be a string"}
}

test_team_of_wrong_type_denied if {
	messages(decide({"principal": {"team": 5}})) == {"input.principal.team must be a string or null"}
}

test_usage_of_wrong_type_denied if {
	messages(decide({"usage": "lots"})) == {"input.usage must be an object or null"}
	messages(decide({"usage": {"principal": [1]}})) == {"input.usage.principal must be an object or null"}
}

test_usage_counter_of_wrong_type_denied if {
	d := decide({"usage": {"principal": {"requests_last_minute": "7"}, "team": {"in_flight": -1}}})
	messages(d) == {
		"input.usage.principal.requests_last_minute must be a number from 0 to 2^53",
		"input.usage.team.in_flight must be a number from 0 to 2^53",
	}
}

test_usage_null_counts_as_absent if {
	decide({"usage": null}).allow
	decide({"usage": {"principal": null, "team": null}}).allow
}

test_empty_input_denied_with_reasons if {
	d := data.govgate.decision with input as {}
		with data.govgate_config as config
	not d.allow
	codes(d) == {"unknown_role", "invalid_input"}
}

test_input_that_is_not_an_object_denied_with_reasons if {
	d := data.govgate.decision with input as ["not", "an", "object"]
		with data.govgate_config as config
	not d.allow
	codes(d) == {"unknown_role", "invalid_input"}
}

# ---------------------------------------------------------------- data

# Data problems are found once, when the policy is loaded (a policy with any
# is refused), so they never show in a decision.

test_fixture_config_has_no_problems if {
	count(config_problems_with({})) == 0
}

test_role_cap_of_wrong_type_is_a_config_problem if {
	config_problems_with({"roles": {"analyst": {"max_tokens": "256"}}}) == {"govgate_config.roles.analyst.max_tokens must be a whole number >= 0"}
}

test_unknown_mode_is_a_config_problem if {
	config_problems_with({"roles": {"analyst": {"max_tokens_mode": "strict"}}}) == {"govgate_config.roles.analyst.max_tokens_mode must be \"clamp\" or \"deny\""}
}

test_bad_default_is_a_config_problem if {
	config_problems_with({"defaults": {"priority": "high"}}) == {"govgate_config.defaults.priority must be a whole number from 0 to 9"}
}

test_settings_of_every_role_are_checked if {
	config_problems_with({"roles": {"viewer": {"max_tokens": "lots"}}}) == {"govgate_config.roles.viewer.max_tokens must be a whole number >= 0"}
}

test_role_that_is_not_an_object_is_ignored if {
	count(config_problems_with({"roles": {"odd": 5}})) == 0
}

test_role_models_not_a_list_is_a_config_problem if {
	config_problems_with({"roles": {"analyst": {"models": "govgate-tiny"}}}) == {"govgate_config.roles.analyst.models must be a list"}
}

test_team_models_not_a_list_is_a_config_problem if {
	config_problems_with({"teams": {"odd": {"models": "govgate-tiny"}}}) == {"govgate_config.teams.odd.models must be a list or null"}
}

test_team_share_must_be_a_number_from_above_0_to_1000 if {
	every value in [0, -1, 1e-300, 0.0009, 1000.5, 5000, "2", true, [1], {"w": 1}] {
		config_problems_with({"teams": {"odd": {"share": value}}}) == {"govgate_config.teams.odd.share must be a number from 0.001 to 1000, or null"}
	}
}

test_team_share_that_is_usable_is_no_problem if {
	every value in [0.001, 0.5, 1, 3, 1000, null] {
		count(config_problems_with({"teams": {"odd": {"share": value}, "default": {"share": 2}}})) == 0
	}
}

test_team_entry_with_an_unknown_setting_is_a_config_problem if {
	config_problems_with({"teams": {"odd": {"shares": 5}}}) == {"govgate_config.teams.odd has an unknown setting shares (known: models, share)"}
	config_problems_with({"teams": {"default": {"share": 1, "model": ["*"]}}}) == {"govgate_config.teams.default has an unknown setting model (known: models, share)"}
}

test_team_entry_with_known_settings_is_no_problem if {
	count(config_problems_with({"teams": {"odd": {"share": 2, "models": ["*"]}, "even": {}, "none": null}})) == 0
}

test_team_entry_of_wrong_type_is_a_config_problem if {
	config_problems_with({"teams": {"odd": 3}}) == {"govgate_config.teams.odd must be an object or null"}
	config_problems_with({"teams": {"odd": ["models"]}}) == {"govgate_config.teams.odd must be an object or null"}
}

test_limit_of_wrong_type_is_a_config_problem if {
	config_problems_with({"limits": {"principals": {"default": {"in_flight": "4"}}}}) == {"govgate_config.limits.principals.default.in_flight must be a whole number >= 0 or null"}
}

test_limit_of_an_own_entry_is_checked if {
	config_problems_with({"limits": {"teams": {"t-9": {"in_flight": -1}}}}) == {"govgate_config.limits.teams.t-9.in_flight must be a whole number >= 0 or null"}
}

test_bad_limits_of_two_entries_are_two_problems if {
	config_problems_with({"limits": {"principals": {"a": {"in_flight": -1}, "b": {"in_flight": -1}}}}) == {
		"govgate_config.limits.principals.a.in_flight must be a whole number >= 0 or null",
		"govgate_config.limits.principals.b.in_flight must be a whole number >= 0 or null",
	}
}

test_unknown_key_of_limits_is_a_config_problem if {
	# a misspelled `principal`: accepted, it lifted every principal's limits
	config_problems_with({"limits": {"principal": {"default": {"in_flight": 1}}}}) == {"govgate_config.limits has an unknown key principal (known: principals, teams)"}
	count(config_problems_with({"limits": {"principals": {}, "teams": null}})) == 0
}

test_an_unknown_limit_name_is_a_config_problem if {
	config_problems_with({"limits": {"principals": {"h8fl": {"request_per_minute": 1, "in_flight": 2}}}}) == {"govgate_config.limits.principals.h8fl has an unknown limit request_per_minute (known: requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month, in_flight)"}
}

test_limits_entry_of_wrong_type_is_a_config_problem if {
	config_problems_with({"limits": {"teams": {"t-1": 600}}}) == {"govgate_config.limits.teams.t-1 must be an object"}
}

test_purpose_lists_of_wrong_type_are_config_problems if {
	config_problems_with({"purposes": {"allowed": "research"}}) == {"govgate_config.purposes.allowed must be a list of strings"}
	config_problems_with({"models": {"legal": {"purposes": [1]}}}) == {"govgate_config.models.legal.purposes must be a list of strings or null"}
}

test_numbers_beyond_two_to_the_53_denied if {
	# the engines round and print such numbers differently
	codes(decide({"request": {"max_tokens": 1000000000000000000000000000000}})) == {"invalid_input"}
	codes(decide({"usage": {"principal": {"tokens_today": 1e300}}})) == {"invalid_input"}
}

test_config_that_is_not_an_object_is_a_config_problem if {
	problems := data.govgate.config_problems with data.govgate_config as ["admin"]
	problems == {"govgate_config must be an object"}
}

test_config_sections_of_the_wrong_type_are_config_problems if {
	config_problems_with({"limits": {"principals": [{"requests_per_minute": 1}]}}) == {"govgate_config.limits.principals must be an object or null"}
	config_problems_with({"roles": ["analyst"]}) == {"govgate_config.roles must be an object or null"}
	config_problems_with({"teams": "research"}) == {"govgate_config.teams must be an object or null"}
	config_problems_with({"limits": 5}) == {"govgate_config.limits must be an object or null"}
}

test_config_problems_do_not_depend_on_the_input if {
	problems := data.govgate.config_problems with input as {}
		with data.govgate_config as object.union(config, {"models": {"night": {"hours_utc": [9]}}})
	problems == {"govgate_config.models.night.hours_utc must be [start, end] in whole hours from 0 to 24"}
}

test_normalized_text_of_wrong_type_denied if {
	messages(decide({"request": {"normalized_text": ["hi"]}})) == {"input.request.normalized_text must be a string"}
	messages(decide({"request": {"normalized_text": null}})) == {"input.request.normalized_text must be a string"}
}

test_ignore_spacing_of_wrong_type_is_a_config_problem if {
	rule := {"id": "k", "pattern": "secret", "ignore_spacing": "yes"}
	config_problems_with({"content": {"blocked_patterns": [rule]}}) == {"govgate_config.content.blocked_patterns[0].ignore_spacing must be true or false"}
}

test_an_unknown_key_anywhere_in_the_data_is_a_config_problem if {
	config_problems_with({"limit": {"principals": {}}}) == {"govgate_config has an unknown key limit (known: content, defaults, limits, models, purposes, roles, teams)"}
	config_problems_with({"defaults": {"prompt_loging": "hash"}}) == {"govgate_config.defaults has an unknown key prompt_loging (known: max_tokens, max_tokens_mode, priority, prompt_logging)"}
	config_problems_with({"purposes": {"required_for_tag": ["restricted"]}}) == {"govgate_config.purposes has an unknown key required_for_tag (known: allowed, required_for_tags)"}
	config_problems_with({"content": {"blocked_pattern": ["x"]}}) == {"govgate_config.content has an unknown key blocked_pattern (known: blocked_patterns, detectors, national_ids, output)"}
	config_problems_with({"content": {"output": {"detector": {}}}}) == {"govgate_config.content.output has an unknown key detector (known: detectors, roles)"}
	config_problems_with({"roles": {"analyst": {"model": ["*"], "max_token": 5}}}) == {
		"govgate_config.roles.analyst has an unknown setting max_token (known: max_tokens, max_tokens_mode, models, priority, prompt_logging)",
		"govgate_config.roles.analyst has an unknown setting model (known: max_tokens, max_tokens_mode, models, priority, prompt_logging)",
	}
	config_problems_with({"models": {"m": {"hours": [6, 22], "purpose": ["x"]}}}) == {
		"govgate_config.models.m has an unknown setting hours (known: hours_utc, purposes, weekdays)",
		"govgate_config.models.m has an unknown setting purpose (known: hours_utc, purposes, weekdays)",
	}
}

test_role_cap_of_zero_under_clamp_refused if {
	config_problems_with({"roles": {"analyst": {"max_tokens": 0, "max_tokens_mode": "clamp"}}}) == {"govgate_config.roles.analyst.max_tokens is 0 with max_tokens_mode \"clamp\": every request would be allowed 0 tokens; to suspend the role use \"models\": [] or max_tokens_mode \"deny\""}
}

test_role_cap_of_zero_under_deny_or_without_models_accepted if {
	config_problems_with({"roles": {"analyst": {"max_tokens": 0, "max_tokens_mode": "deny"}}}) == set()
	config_problems_with({"roles": {"analyst": {"max_tokens": 0, "max_tokens_mode": "clamp", "models": []}}}) == set()
}
