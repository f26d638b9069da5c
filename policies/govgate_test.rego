# Unit tests for govgate.rego: how the decision is assembled, and the
# data.json that ships. They run under `opa test policies/` and under
# regorus via tests/policy/test_rego_units.py.
package govgate_test

import rego.v1

import data.govgate_test.fixtures.base_input
import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.decide_as
import data.govgate_test.fixtures.text_request

# ---------------------------------------------------------------- decision shape

test_allowed_request_has_no_reasons if {
	d := decide({})
	d.allow
	d.reasons == []
}

test_decision_has_contract_shape if {
	d := decide({})
	object.keys(d) == {"allow", "reasons", "obligations"}
	object.keys(d.obligations) == {"max_tokens", "priority", "prompt_logging", "redact", "limits"}
}

test_denied_request_has_obligations_too if {
	d := decide_as(["viewer"], "govgate-tiny", 10)
	not d.allow
	object.keys(d.obligations) == {"max_tokens", "priority", "prompt_logging", "redact", "limits"}
}

test_granted_model_denied_when_another_rule_denies if {
	d := data.govgate.decision with input as base_input
		with data.govgate_config as config
		with data.govgate.denials as {{"code": "over_budget", "message": "m"}}
	not d.allow
	d.reasons == [{"code": "over_budget", "message": "m"}]
}

test_denial_without_reason_gets_generic_reason if {
	d := data.govgate.decision with input as base_input
		with data.govgate_config as config
		with data.govgate.model_permitted as false
		with data.govgate.denials as set()
	not d.allow
	codes(d) == {"denied"}
}

test_reasons_sorted_by_code_then_message if {
	denials := {
		{"code": "b", "message": "2"},
		{"code": "a", "message": "z", "retry_after_s": 5},
		{"code": "b", "message": "1"},
		{"code": "a", "message": "y"},
	}
	d := data.govgate.decision with input as base_input
		with data.govgate_config as config
		with data.govgate.denials as denials
	d.reasons == [
		{"code": "a", "message": "y"},
		{"code": "a", "message": "z", "retry_after_s": 5},
		{"code": "b", "message": "1"},
		{"code": "b", "message": "2"},
	]
}

test_every_reason_of_a_denial_is_reported if {
	d := decide(object.union(
		{"principal": {"roles": ["viewer"]}, "request": {"max_tokens": "many"}},
		text_request("-----BEGIN RSA PRIVATE KEY-----"),
	))
	codes(d) == {"model_not_allowed", "invalid_input", "blocked_content"}
}

test_defaults_fill_settings_the_data_leaves_out if {
	d := data.govgate.decision with input as base_input
		with data.govgate_config as {"roles": {"analyst": {"models": ["govgate-tiny"]}}}
	d.allow
	d.obligations.max_tokens == 100
	d.obligations.priority == 5
	d.obligations.prompt_logging == "full"
}

test_no_config_denies_nothing_is_granted if {
	d := data.govgate.decision with input as base_input
		with data.govgate_config as {}
	not d.allow
	codes(d) == {"unknown_role"}
}

# ---------------------------------------------------------------- shipped data.json

shipped_request(roles, model, max_tokens, text) := d if {
	d := data.govgate.decision with input as object.union(base_input, {
		"principal": {"roles": roles},
		"request": {"model": model, "max_tokens": max_tokens, "text": text},
		"model": {"name": model},
	})
}

test_shipped_config_has_no_problems if {
	count(data.govgate.config_problems) == 0
}

test_shipped_config_analyst_limited_to_builtin_models if {
	d := shipped_request(["analyst"], "govgate-tiny", 1000, "hello")
	d.allow
	d.obligations.max_tokens == 256
	g := shipped_request(["analyst"], "gemma-3-270m", 100, "hello")
	g.allow
	e := shipped_request(["analyst"], "other", 10, "hello")
	not e.allow
}

test_shipped_config_admin_may_use_any_model if {
	d := shipped_request(["admin"], "big", 100000, "hello")
	d.allow
	d.obligations.max_tokens == 4096
}

test_shipped_config_viewer_may_use_no_model if {
	d := shipped_request(["viewer"], "govgate-tiny", 10, "hello")
	codes(d) == {"model_not_allowed"}
}

test_shipped_config_allows_an_ordinary_request_with_busy_counters if {
	d := data.govgate.decision with input as object.union(base_input, {"usage": {
		"principal": {"requests_last_minute": 100, "tokens_last_minute": 5000, "tokens_today": 100000, "tokens_this_month": 1000000, "in_flight": 4, "minute_window_frees_in_s": 30},
		"team": null,
	}})
	d.allow
}

test_shipped_config_redacts_an_email_address if {
	d := shipped_request(["analyst"], "govgate-tiny", 10, "write to ann@example.org")
	d.allow
	d.obligations.prompt_logging == "redacted"
	d.obligations.redact == [{"detector": "email", "text": "ann@example.org"}]
}

test_shipped_config_denies_a_payment_card if {
	d := shipped_request(["analyst"], "govgate-tiny", 10, "my card is 4111 1111 1111 1111")
	codes(d) == {"pii_detected"}
}

test_shipped_config_settings_are_valid if {
	problems := data.govgate.config_problems with input as object.union(base_input, {"principal": {"roles": object.keys(data.govgate_config.roles)}})
	problems == set()
}

test_shipped_config_patterns_are_usable_on_both_engines if {
	content := data.govgate_config.content
	every rule in array.concat(content.blocked_patterns, content.national_ids) {
		data.govgate.usable_pattern(rule.pattern)
	}
}
