# Unit tests for obligations.rego: priority, prompt logging, and the shape
# of what the gateway must enforce.
package govgate.obligations_test

import rego.v1

import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.config_problems_with
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.decide_as

# ---------------------------------------------------------------- priority

test_priority_defaults_to_data_default if {
	decide_as(["analyst"], "govgate-tiny", 10).obligations.priority == 5
}

test_priority_set_by_role if {
	decide_as(["admin"], "govgate-tiny", 10).obligations.priority == 2
}

test_most_urgent_priority_among_granting_roles_wins if {
	decide_as(["batch", "admin", "oncall"], "govgate-tiny", 10).obligations.priority == 0
	decide_as(["batch", "analyst"], "govgate-tiny", 10).obligations.priority == 5
}

test_priority_of_role_not_granting_model_ignored if {
	# oncall (0) may not use big; batch (8) decides
	decide_as(["batch", "oncall"], "big", 10).obligations.priority == 8
}

test_denied_request_gets_default_priority if {
	decide_as(["viewer"], "govgate-tiny", 10).obligations.priority == 5
}

test_priority_without_data_default_is_five if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.base_input
		with data.govgate_config as {"roles": {"analyst": {"models": ["*"]}}}
	d.obligations.priority == 5
}

test_priority_out_of_range_is_a_config_problem if {
	config_problems_with({"roles": {"analyst": {"priority": 10}}}) == {"govgate_config.roles.analyst.priority must be a whole number from 0 to 9"}
}

# ---------------------------------------------------------------- prompt logging

test_prompt_logging_defaults_to_full if {
	decide_as(["analyst"], "govgate-tiny", 10).obligations.prompt_logging == "full"
}

test_prompt_logging_set_by_role if {
	decide_as(["counsel"], "govgate-tiny", 10).obligations.prompt_logging == "hash"
}

test_most_private_prompt_logging_among_roles_applies if {
	decide_as(["admin", "hr"], "govgate-tiny", 10).obligations.prompt_logging == "redacted"
	decide_as(["hr", "counsel"], "govgate-tiny", 10).obligations.prompt_logging == "hash"
}

test_prompt_logging_of_a_denied_request_follows_roles if {
	# hr may use no model; its prompts are still redacted in the log
	decide_as(["hr"], "govgate-tiny", 10).obligations.prompt_logging == "redacted"
}

test_prompt_logging_default_comes_from_data if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.base_input
		with data.govgate_config as object.union(config, {"defaults": {"prompt_logging": "redacted"}})
	d.obligations.prompt_logging == "redacted"
}

test_prompt_logging_of_principal_without_known_role_is_default if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.input_with({"principal": {"roles": []}})
		with data.govgate_config as object.union(config, {"defaults": {"prompt_logging": "hash"}})
	d.obligations.prompt_logging == "hash"
}

test_unknown_prompt_logging_level_is_a_config_problem if {
	config_problems_with({"roles": {"analyst": {"prompt_logging": "verbose"}}}) == {"govgate_config.roles.analyst.prompt_logging must be \"full\", \"redacted\" or \"hash\""}
}

# ---------------------------------------------------------------- redact

test_redact_is_empty_when_nothing_is_found if {
	decide({}).obligations.redact == []
}
