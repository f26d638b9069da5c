# Unit tests for output.rego: the output decision on generated text, the
# per-role actions, and the load-time check of govgate_config.content.output.
package govgate.output_test

import rego.v1

import data.govgate_test.fixtures.config

# The fixture config with output rules: cards and private keys stop, SSNs and
# IBANs are masked, e-mail and phone numbers pass; hr may see SSNs, intern
# gets e-mail addresses masked, counsel gets them stopped, and translator
# sees e-mail addresses whatever else it holds.
output_config := object.union(config, {"content": {"output": {
	"detectors": {
		"email": {"action": "allow"},
		"phone": {"action": "allow"},
		"payment_card": {"action": "stop"},
		"iban": {"action": "redact"},
		"us_ssn": {"action": "redact"},
		"private_key": {"action": "stop"},
	},
	"roles": {
		"hr": {"us_ssn": "allow"},
		"intern": {"email": "redact"},
		"counsel": {"email": "stop", "us_ssn": "stop"},
		"translator": {"email": "allow"},
	},
}}})

# An output window for a principal holding `roles`, as gateway/requests/output_input.py builds it.
window(text, roles) := {
	"principal": {"id": "u-1", "team": "t-1", "roles": roles, "key_id": "k-1"},
	"model": {"name": "govgate-tiny", "family": "llama", "context_length": 256, "tags": []},
	"request": {"endpoint": "chat.completions", "model": "govgate-tiny", "purpose": null, "stream": true, "max_tokens": 100},
	"decision": {"allow": true, "obligations": {"max_tokens": 100, "prompt_logging": "full", "redact": []}},
	"output": {"text": text, "normalized_text": text, "offset": 0, "final": true},
}

judge(text, roles) := d if {
	d := data.govgate.output_decision with input as window(text, roles)
		with data.govgate_config as output_config
}

codes(d) := {r.code | some r in d.reasons}

# ---------------------------------------------------------------- shipped behaviour

test_clean_output_allowed_with_nothing_to_mask if {
	judge("The capital of France is Paris.", ["analyst"]) == {"allow": true, "reasons": [], "obligations": {"redact": [], "log_redact": []}}
}

test_card_number_stops_naming_detector_not_value if {
	d := judge("use 4111 1111 1111 1111 to pay", ["analyst"])
	d.allow == false
	d.reasons == [{"code": "output_pii_detected", "message": "the output contains personal data found by detector 'payment_card' (1 found)"}]
}

test_stop_lists_stopping_findings_for_the_audit if {
	d := judge("use 4111 1111 1111 1111, ssn 123-45-6789", ["analyst"])
	d.obligations.redact == [
		{"detector": "payment_card", "text": "4111 1111 1111 1111"},
		{"detector": "us_ssn", "text": "123-45-6789"},
	]
}

test_redact_detector_masks_and_allows if {
	d := judge("her ssn is 123-45-6789 and IBAN DE89 3704 0044 0532 0130 00", ["analyst"])
	d.allow
	d.obligations.redact == [
		{"detector": "iban", "text": "DE89 3704 0044 0532 0130 00"},
		{"detector": "us_ssn", "text": "123-45-6789"},
	]
}

test_allowed_detector_neither_masks_nor_stops if {
	judge("write to ops@example.com or call +1 555 123 4567", ["analyst"]) == {"allow": true, "reasons": [], "obligations": {"redact": [], "log_redact": []}}
}

# A request logged "redacted" (prompt_logging from its decision).
judge_logged_redacted(text, roles) := d if {
	d := data.govgate.output_decision with input as json.patch(window(text, roles), [{"op": "replace", "path": "/decision/obligations/prompt_logging", "value": "redacted"}])
		with data.govgate_config as output_config
}

test_under_redacted_logging_allowed_findings_are_masked_in_the_log_only if {
	d := judge_logged_redacted("write to ops@example.com, IBAN DE89 3704 0044 0532 0130 00", ["analyst"])
	d.allow
	d.obligations.redact == [{"detector": "iban", "text": "DE89 3704 0044 0532 0130 00"}]
	d.obligations.log_redact == [{"detector": "email", "text": "ops@example.com"}]
}

test_under_full_logging_nothing_more_is_masked_in_the_log if {
	judge("write to ops@example.com", ["analyst"]).obligations.log_redact == []
}

test_a_finding_the_client_does_not_get_is_not_listed_twice if {
	d := judge_logged_redacted("write to ops@example.com", ["intern"])
	d.obligations.redact == [{"detector": "email", "text": "ops@example.com"}]
	d.obligations.log_redact == []
}

test_private_key_header_stops if {
	d := judge("here it is:\n-----BEGIN RSA PRIVATE KEY-----\nMIIE", ["analyst"])
	d.reasons == [{"code": "output_blocked_content", "message": "the output matches blocked content rule 'private_key'"}]
	d.obligations.redact == []
}

test_private_key_header_split_across_lines_stops if {
	codes(judge("-----BEGIN RSA PRIV\nATE KEY-----", ["analyst"])) == {"output_blocked_content"}
}

test_normalised_view_is_searched if {
	d := data.govgate.output_decision with input as json.patch(window("4111\u200b1111 1111 1111", ["analyst"]), [{"op": "replace", "path": "/output/normalized_text", "value": "41111111 1111 1111"}])
		with data.govgate_config as output_config
	codes(d) == {"output_pii_detected"}
}

test_digits_inside_an_iban_are_the_iban_even_where_phones_are_masked if {
	phones_masked := object.union(output_config, {"content": {"output": {"detectors": {"phone": {"action": "redact"}}}}})
	d := data.govgate.output_decision with input as window("IBAN DE89 3704 0044 0532 0130 00", ["analyst"])
		with data.govgate_config as phones_masked
	d.obligations.redact == [{"detector": "iban", "text": "DE89 3704 0044 0532 0130 00"}]
}

test_stop_and_invalid_reasons_sorted if {
	d := judge("4111 1111 1111 1111 -----BEGIN PRIVATE KEY-----", ["analyst"])
	[r.code | some r in d.reasons] == ["output_blocked_content", "output_pii_detected"]
}

# ---------------------------------------------------------------- per-role actions

test_role_may_allow_what_the_default_masks if {
	judge("ssn 123-45-6789", ["hr"]).obligations.redact == []
}

test_role_may_be_stricter_than_the_default if {
	d := judge("ssn 123-45-6789", ["counsel"])
	codes(d) == {"output_pii_detected"}
}

test_most_permissive_of_the_roles_that_set_an_action_wins if {
	# counsel stops SSNs, hr allows them: hr's grant holds
	judge("ssn 123-45-6789", ["counsel", "hr"]).allow
	judge("ssn 123-45-6789", ["counsel", "hr"]).obligations.redact == []

	# intern masks e-mail, counsel stops it: masking is the more permissive
	d := judge("mail a@b.example", ["intern", "counsel"])
	d.allow
	d.obligations.redact == [{"detector": "email", "text": "a@b.example"}]

	# translator allows e-mail: nothing to mask
	judge("mail a@b.example", ["intern", "translator"]).obligations.redact == []
}

test_role_without_a_setting_leaves_the_default if {
	# analyst sets nothing: counsel's stop holds for a principal with both
	codes(judge("ssn 123-45-6789", ["counsel", "analyst"])) == {"output_pii_detected"}
}

test_unknown_or_malformed_roles_take_the_defaults if {
	judge("ssn 123-45-6789", ["nobody", 7]).obligations.redact == [{"detector": "us_ssn", "text": "123-45-6789"}]
	d := data.govgate.output_decision with input as json.patch(window("ssn 123-45-6789", []), [{"op": "replace", "path": "/principal/roles", "value": "hr"}])
		with data.govgate_config as output_config
	d.obligations.redact == [{"detector": "us_ssn", "text": "123-45-6789"}]
}

# ---------------------------------------------------------------- data and input

test_data_without_output_rules_allows_every_output if {
	d := data.govgate.output_decision with input as window("4111 1111 1111 1111 123-45-6789", ["analyst"])
		with data.govgate_config as config
	d == {"allow": true, "reasons": [], "obligations": {"redact": [], "log_redact": []}}
}

test_output_detector_unconfigured_for_prompts_still_runs_on_outputs if {
	prompt_free := object.union(output_config, {"content": {"detectors": {}}})
	d := data.govgate.output_decision with input as window("4111 1111 1111 1111", ["analyst"])
		with data.govgate_config as prompt_free
	codes(d) == {"output_pii_detected"}
}

test_missing_output_text_stops_with_invalid_input if {
	d := data.govgate.output_decision with input as json.remove(window("x", ["analyst"]), ["output/text"])
		with data.govgate_config as output_config
	d.allow == false
	d.reasons == [{"code": "invalid_input", "message": "input.output.text must be a string"}]
}

test_normalized_text_of_wrong_type_stops if {
	d := data.govgate.output_decision with input as json.patch(window("x", ["analyst"]), [{"op": "replace", "path": "/output/normalized_text", "value": 5}])
		with data.govgate_config as output_config
	codes(d) == {"invalid_input"}
}

test_empty_input_stops_rather_than_being_undefined if {
	d := data.govgate.output_decision with input as {}
		with data.govgate_config as output_config
	d.allow == false
	codes(d) == {"invalid_input"}
}

# ---------------------------------------------------------------- load-time check

output_problems(output) := problems if {
	problems := data.govgate.config_problems with data.govgate_config as object.union(config, {"content": {"output": output}})
}

test_shipped_style_output_config_has_no_problems if {
	problems := data.govgate.config_problems with data.govgate_config as output_config
	count(problems) == 0
}

test_output_config_of_wrong_shape_refused if {
	output_problems(5) == {"govgate_config.content.output must be an object"}
	output_problems({"detectors": [], "roles": "x"}) == {
		"govgate_config.content.output.detectors must be an object",
		"govgate_config.content.output.roles must be an object",
	}
}

test_unknown_action_refused if {
	output_problems({"detectors": {"email": {"action": "deny"}, "phone": "stop", "iban": {"action": "stop", "x": 1}}}) == {
		`govgate_config.content.output.detectors.email must be {"action": "allow", "redact" or "stop"}`,
		`govgate_config.content.output.detectors.phone must be {"action": "allow", "redact" or "stop"}`,
		`govgate_config.content.output.detectors.iban must be {"action": "allow", "redact" or "stop"}`,
	}
	output_problems({"roles": {"hr": {"email": "deny"}, "intern": ["email"]}}) == {
		`govgate_config.content.output.roles.hr.email must be "allow", "redact" or "stop"`,
		"govgate_config.content.output.roles.intern must be an object of detector names and actions",
	}
}

# A detector entry without an action, beside a blocked pattern's: regorus's
# interpreter stopped the whole check ("not an object") rather than name it.
test_entry_without_action_beside_a_blocked_pattern_refused if {
	output_problems({"detectors": {"payment_card": {}, "private_key": {"action": "stop"}}}) == {
		`govgate_config.content.output.detectors.payment_card must be {"action": "allow", "redact" or "stop"}`,
	}
}

test_unknown_detector_name_refused if {
	output_problems({"detectors": {"passport": {"action": "stop"}}, "roles": {"hr": {"fax": "allow"}}}) == {
		"govgate_config.content.output.detectors.passport names no detector (built-in: email, iban, payment_card, phone; or a national_ids or blocked_patterns id)",
		"govgate_config.content.output.roles.hr.fax names no detector (built-in: email, iban, payment_card, phone; or a national_ids or blocked_patterns id)",
	}
}

test_blocked_pattern_cannot_be_redacted if {
	output_problems({"detectors": {"private_key": {"action": "redact"}}, "roles": {"hr": {"private_key": "redact"}}}) == {
		`govgate_config.content.output.detectors.private_key: a blocked pattern's action is "allow" or "stop" (a pattern's match is no finding to mask)`,
		`govgate_config.content.output.roles.hr.private_key: a blocked pattern's action is "allow" or "stop" (a pattern's match is no finding to mask)`,
	}
}

test_name_both_national_id_and_blocked_pattern_refused if {
	clash := object.union(config, {"content": {
		"blocked_patterns": [{"id": "us_ssn", "pattern": "x"}],
		"output": {"detectors": {"us_ssn": {"action": "stop"}}},
	}})
	problems := data.govgate.config_problems with data.govgate_config as clash
	"govgate_config.content.output: 'us_ssn' is both a national id and a blocked pattern" in problems
}

# ---------------------------------------------------------------- shipped data.json

# The output decision under the data.json that ships (no `with data.govgate_config`).
shipped(text, roles) := d if {
	d := data.govgate.output_decision with input as window(text, roles)
}

test_shipped_output_rules_stop_cards_and_keys_for_everyone if {
	every roles in [["admin"], ["analyst"], ["viewer"], []] {
		codes(shipped("card 4111 1111 1111 1111", roles)) == {"output_pii_detected"}
		codes(shipped("-----BEGIN OPENSSH PRIVATE KEY-----", roles)) == {"output_blocked_content"}
	}
}

test_shipped_output_rules_mask_ssn_and_iban_except_for_admins if {
	text := "ssn 123-45-6789 iban DE89 3704 0044 0532 0130 00"
	[f.detector | some f in shipped(text, ["analyst"]).obligations.redact] == ["iban", "us_ssn"]
	shipped(text, ["admin"]).obligations.redact == []
	shipped(text, ["admin"]).allow
}

test_shipped_output_rules_mask_contacts_for_analysts_only if {
	text := "mail ops@example.com, call +1 555 123 4567"
	[f.detector | some f in shipped(text, ["analyst"]).obligations.redact] == ["email", "phone"]
	shipped(text, ["viewer"]).obligations.redact == []
	shipped(text, ["admin", "analyst"]).obligations.redact == shipped(text, ["analyst"]).obligations.redact
}
