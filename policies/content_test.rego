# Unit tests for content.rego: blocked patterns and PII detectors on the
# request text, and what they do to the decision.
package govgate.content_test

import rego.v1

import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.text_request

saying(text) := decide(text_request(text))

# The decision on `text` with govgate_config.content replaced by `content`.

with_content(content, text) := d if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.input_with(text_request(text))
		with data.govgate_config as object.union(object.remove(config, ["content"]), {"content": content})
}

# What the load-time check finds with govgate_config.content replaced by `content`.
content_problems(content) := problems if {
	problems := data.govgate.config_problems with data.govgate_config as object.union(object.remove(config, ["content"]), {"content": content})
}

# ---------------------------------------------------------------- blocked patterns

test_blocked_pattern_denies if {
	d := saying("here: -----BEGIN RSA PRIVATE KEY----- MIIE...")
	codes(d) == {"blocked_content"}
}

test_blocked_message_names_rule_not_text if {
	d := saying("here: -----BEGIN RSA PRIVATE KEY----- MIIE...")
	d.reasons[0].message == "the request matches blocked content rule 'private_key': private keys must not be sent"
	not contains(d.reasons[0].message, "MIIE")
}

# A blocked pattern guards a secret: the denied request's prompt is kept as a
# digest only, whatever the role's level (probe s54: kept in clear under full).
test_blocked_pattern_keeps_the_prompt_as_a_digest_only if {
	d := saying("here: -----BEGIN RSA PRIVATE KEY----- MIIE...")
	d.obligations.prompt_logging == "hash"
}

test_blocked_pattern_with_personal_data_too_is_kept_as_a_digest if {
	d := saying("mail ann@example.com the key -----BEGIN RSA PRIVATE KEY----- MIIE...")
	codes(d) == {"blocked_content"}
	d.obligations.prompt_logging == "hash"
}

test_blocked_pattern_without_message if {
	d := with_content({"blocked_patterns": [{"id": "secret", "pattern": "(?i)top secret"}]}, "this is Top Secret")
	d.reasons == [{"code": "blocked_content", "message": "the request matches blocked content rule 'secret'"}]
}

test_text_without_blocked_pattern_allowed if {
	saying("how do private keys work?").allow
}

# ---------------------------------------------------------------- detectors

test_deny_detector_denies_naming_detector_not_value if {
	d := saying("card 4111 1111 1111 1111")
	d.reasons == [{"code": "pii_detected", "message": "the request contains personal data found by detector 'payment_card' (1 found)"}]
}

test_national_id_deny_detector_denies if {
	d := saying("my ssn is 123-45-6789")
	codes(d) == {"pii_detected"}
	contains(d.reasons[0].message, "'us_ssn'")
}

test_redact_detector_allows_and_redacts if {
	d := saying("mail ann@example.org or call +44 20 7946 0958")
	d.allow
	d.obligations.prompt_logging == "redacted"
	d.obligations.redact == [
		{"detector": "email", "text": "ann@example.org"},
		{"detector": "phone", "text": "+44 20 7946 0958"},
	]
}

test_redact_list_is_sorted_and_unique if {
	d := saying("b@example.org, a@example.org, b@example.org, DE89370400440532013000")
	d.obligations.redact == [
		{"detector": "email", "text": "a@example.org"},
		{"detector": "email", "text": "b@example.org"},
		{"detector": "iban", "text": "DE89370400440532013000"},
	]
}

test_nothing_found_leaves_logging_and_redact_alone if {
	d := saying("hello there")
	d.obligations.prompt_logging == "full"
	d.obligations.redact == []
}

test_hash_logging_stays_hash_when_redacting if {
	d := decide({"principal": {"roles": ["counsel"]}, "request": {"text": "ann@example.org"}})
	d.allow
	d.obligations.prompt_logging == "hash"
	d.obligations.redact == [{"detector": "email", "text": "ann@example.org"}]
}

test_denied_request_redacts_deny_findings_too if {
	d := saying("ann@example.org 4111111111111111")
	not d.allow
	d.obligations.prompt_logging == "redacted"
	d.obligations.redact == [
		{"detector": "email", "text": "ann@example.org"},
		{"detector": "payment_card", "text": "4111111111111111"},
	]
}

test_unconfigured_detector_finds_nothing if {
	d := with_content({"detectors": {"email": {"action": "redact"}}}, "card 4111 1111 1111 1111")
	d.allow
	d.obligations.redact == []
}

test_phone_inside_national_id_is_the_national_id if {
	# 123-45-6789 also has the shape of a phone number
	d := with_content(
		{
			"national_ids": config.content.national_ids,
			"detectors": {"phone": {"action": "redact"}, "us_ssn": {"action": "redact"}},
		},
		"id 123-45-6789",
	)
	d.obligations.redact == [{"detector": "us_ssn", "text": "123-45-6789"}]
}

test_numbers_inside_an_iban_are_the_iban if {
	d := with_content({"detectors": {"phone": {"action": "redact"}, "payment_card": {"action": "deny"}, "iban": {"action": "redact"}}}, "IBAN DE89 3704 0044 0532 0130 00")
	d.allow
	d.obligations.redact == [{"detector": "iban", "text": "DE89 3704 0044 0532 0130 00"}]
}

test_card_that_looks_like_a_phone_is_a_card if {
	d := with_content({"detectors": {"phone": {"action": "redact"}, "payment_card": {"action": "redact"}}}, "amex 3782 822463 10005")
	d.obligations.redact == [{"detector": "payment_card", "text": "3782 822463 10005"}]
}

test_card_in_an_email_address_is_the_address if {
	d := saying("4111111111111111@example.org")
	d.allow
	d.obligations.redact == [{"detector": "email", "text": "4111111111111111@example.org"}]
}

# ---------------------------------------------------------------- data problems

test_unknown_detector_name_is_a_config_problem if {
	count(content_problems({"detectors": {"passport": {"action": "deny"}}})) == 1
}

test_unknown_detector_action_is_a_config_problem if {
	content_problems({"detectors": {"email": {"action": "mask"}}}) == {"govgate_config.content.detectors.email.action must be \"deny\" or \"redact\""}
}

test_invalid_pattern_is_a_config_problem if {
	content_problems({"blocked_patterns": [{"id": "bad", "pattern": "[a-"}]}) == {"govgate_config.content.blocked_patterns[0] needs a string id and a usable pattern"}
}

test_unicode_dependent_class_is_a_config_problem if {
	# \d is Unicode on regorus and ASCII on OPA: the engines would disagree
	count(content_problems({"blocked_patterns": [{"id": "digits", "pattern": `\d{4}`}]})) == 1
	count(content_problems({"national_ids": [{"id": "x", "pattern": `\bX[0-9]+`}], "detectors": {}})) == 1
}

test_escaped_backslash_before_d_is_usable if {
	data.govgate.usable_pattern(`C:\\dir`)
	not data.govgate.usable_pattern(`C:\\\d`)
}

test_national_id_named_like_a_builtin_is_a_config_problem if {
	count(content_problems({"national_ids": [{"id": "email", "pattern": "x"}], "detectors": {}})) == 1
}

test_duplicate_national_id_is_a_config_problem if {
	problems := content_problems({"national_ids": [{"id": "x", "pattern": "a"}, {"id": "x", "pattern": "b"}], "detectors": {}})
	"govgate_config.content.national_ids has the id 'x' more than once" in problems
}

test_text_that_is_not_a_string_denied if {
	codes(saying(["a", "b"])) == {"invalid_input"}
}

test_blocked_rule_with_an_id_that_is_not_a_string_is_a_config_problem if {
	content_problems({"blocked_patterns": [{"id": 7, "pattern": "secret"}]}) == {"govgate_config.content.blocked_patterns[0] needs a string id and a usable pattern"}
}

test_constructs_the_engines_disagree_on_are_unusable if {
	every pattern in [`(?x)a b`, `(?u)a`, `[a-z&&[^aeiou]]`, `[a--b]`, `a{,3}`, `a{1001}`, `a{2,5000}`, `.{200}`, `\w+`, `\S`] {
		not data.govgate.usable_pattern(pattern)
	}
}

test_portable_constructs_are_usable if {
	every pattern in [`(?i)secret`, `(?P<n>a)`, `(?s:a.b)`, `[[:alpha:]]+`, `\pL`, `a{2,99}`, `-----BEGIN [A-Z ]*PRIVATE KEY-----`, `[0-9]{3}-[0-9]{2}`] {
		data.govgate.usable_pattern(pattern)
	}
}

# ---------------------------------------------------------------- evasions
#
# Each input gives the text as sent and its normalised view as
# gateway/normalize.py writes it (tests/gateway/test_normalize.py checks the same
# pairs); the rules must see through the spelling.

seeing(text, normalized) := decide(data.govgate_test.fixtures.normalized_request(text, normalized))

test_pgp_private_key_block_denied if {
	codes(saying("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBGV...")) == {"blocked_content"}
}

test_openssh_and_encrypted_private_keys_denied if {
	codes(saying("-----BEGIN OPENSSH PRIVATE KEY-----")) == {"blocked_content"}
	codes(saying("-----BEGIN ENCRYPTED PRIVATE KEY-----")) == {"blocked_content"}
}

test_lowercase_private_key_denied if {
	codes(saying("-----begin pgp private key block-----")) == {"blocked_content"}
}

test_private_key_split_over_two_messages_denied if {
	# messages "-----BEGIN RSA PRIV" and "ATE KEY-----": joined with a newline
	text := "-----BEGIN RSA PRIV\nATE KEY-----\nMIIEpAIBAAKCAQEA"
	codes(seeing(text, text)) == {"blocked_content"}
}

test_private_key_split_at_a_space_over_two_messages_denied if {
	text := "-----BEGIN RSA PRIVATE\nKEY-----"
	codes(seeing(text, text)) == {"blocked_content"}
}

test_private_key_with_zero_width_space_denied if {
	d := seeing("-----BEGIN RSA PRI\u200bVATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----")
	codes(d) == {"blocked_content"}
}

test_private_key_with_nbsp_denied if {
	d := seeing("-----BEGIN\u00a0RSA\u00a0PRIVATE\u00a0KEY-----", "-----BEGIN RSA PRIVATE KEY-----")
	codes(d) == {"blocked_content"}
}

test_private_key_with_homoglyphs_denied if {
	# Cyrillic Р and А in PRIVATE
	d := seeing("-----BEGIN RSA \u0420RIV\u0410TE KEY-----", "-----BEGIN RSA PRIVATE KEY-----")
	codes(d) == {"blocked_content"}
}

test_private_key_with_tabs_denied if {
	d := seeing("-----BEGIN\tRSA\tPRIVATE\tKEY-----", "-----BEGIN RSA PRIVATE KEY-----")
	codes(d) == {"blocked_content"}
}

test_private_key_spelt_with_spaces_between_letters_denied if {
	text := "- - - - - B E G I N  P R I V A T E  K E Y - - - - -"
	codes(seeing(text, "- - - - - B E G I N P R I V A T E K E Y - - - - -")) == {"blocked_content"}
}

test_talking_about_private_keys_allowed if {
	saying("the file starts with BEGIN PRIVATE KEY; is that a key?").allow
	text := "how do I keep a private\nkey safe?"
	seeing(text, text).allow
}

test_spacing_ignored_only_for_rules_that_ask if {
	d := with_content({"blocked_patterns": [{"id": "s", "pattern": "(?i)topsecret"}]}, "top secret")
	d.allow
	spaced := {"blocked_patterns": [{"id": "s", "pattern": "(?i)topsecret", "ignore_spacing": true}]}
	codes(with_content(spaced, "top secret")) == {"blocked_content"}
}

test_blocked_pattern_still_matches_the_text_as_sent if {
	# a rule written for non-Latin text sees it unfolded
	d := with_content({"blocked_patterns": [{"id": "cyr", "pattern": "РУБЛЬ"}]}, "цена: РУБЛЬ")
	codes(d) == {"blocked_content"}
}

test_ssn_with_spaces_denied if {
	d := saying("my ssn is 123 45 6789")
	codes(d) == {"pii_detected"}
	d.obligations.redact == [{"detector": "us_ssn", "text": "123 45 6789"}]
}

test_ssn_with_unicode_hyphens_denied if {
	d := seeing("ssn 123\u201045\u20116789 or 123\u201345\u22126789", "ssn 123-45-6789 or 123-45-6789")
	codes(d) == {"pii_detected"}
	d.obligations.redact == [{"detector": "us_ssn", "text": "123-45-6789"}]
}

test_ssn_with_full_width_digits_denied if {
	d := seeing("ssn \uff11\uff12\uff13-\uff14\uff15-\uff16\uff17\uff18\uff19", "ssn 123-45-6789")
	codes(d) == {"pii_detected"}
}

test_card_glued_to_letters_denied if {
	d := saying("card4111111111111111please")
	codes(d) == {"pii_detected"}
	d.obligations.redact == [{"detector": "payment_card", "text": "4111111111111111"}]
}

test_card_split_by_dots_denied if {
	d := saying("card 4111.1111.1111.1111")
	codes(d) == {"pii_detected"}
	d.obligations.redact == [{"detector": "payment_card", "text": "4111.1111.1111.1111"}]
}

test_card_split_by_zero_width_spaces_denied if {
	d := seeing("card 4111\u200b1111\u200b1111\u200b1111", "card 4111111111111111")
	codes(d) == {"pii_detected"}
}

test_card_with_nbsp_and_full_width_digits_denied if {
	d := seeing("card \uff14\uff11\uff11\uff11\u00a01111\u00a01111\u00a01111", "card 4111 1111 1111 1111")
	codes(d) == {"pii_detected"}
}

test_email_with_homoglyph_redacted_as_folded if {
	d := seeing("mail \u0430nn@example.org", "mail ann@example.org")
	d.allow
	d.obligations.redact == [{"detector": "email", "text": "ann@example.org"}]
}

test_rules_read_the_text_when_no_normalised_view_is_given if {
	# an input written by hand: the text is all there is
	codes(saying("card 4111 1111 1111 1111")) == {"pii_detected"}
	saying("card 4111\u200b1111\u200b1111\u200b1111").allow
}
