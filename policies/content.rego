# Content rules on the prompt text.
#
# Blocked patterns (govgate_config.content.blocked_patterns) deny a request
# whose text matches one: the text as sent, its normalised view
# (input.request.normalized_text: NFKC, invisible characters removed,
# spacing folded, look-alike letters folded; see gateway/normalize.py) or,
# for a rule with "ignore_spacing": true, that view with all spaces and
# line breaks removed, so a secret split across lines or messages is seen
# whole. PII detectors (govgate_config.content.detectors) find personal
# data in the normalised view and either deny the request or let it
# through with the findings redacted from what the gateway stores. The
# built-in detectors are email, phone, payment_card and iban; each entry of
# govgate_config.content.national_ids adds one more, named by its id.
# Messages name the rule or detector, never the matched text.
package govgate

import rego.v1

import data.govgate.pii

builtin_detectors := {"email", "phone", "payment_card", "iban"}

detector_actions := {"deny", "redact"}

# The prompt text; undefined when the input lacks one (checks.rego denies).
request_text := input.request.text if is_string(input.request.text)

# The normalised view the gateway sends; the text as it is for an input
# written without one (a hand-written input for `opa eval`, say).
detection_text := input.request.normalized_text if {
	is_string(input.request.normalized_text)
} else := request_text

# The normalised view without spaces and line breaks: what was split across
# lines or messages, joined. Two plain replaces: a third of what
# regex.replace costs regorus on a long prompt.
compact_text := replace(replace(detection_text, " ", ""), "\n", "")

# ---------------------------------------------------------------- blocked patterns

blocked_patterns := patterns if {
	patterns = object.get(config, ["content", "blocked_patterns"], null)
	is_array(patterns)
} else := []

# Every rule is usable: the load-time check (checks.rego) refuses data with
# one that is not.
content_denials contains {"code": "blocked_content", "message": msg} if {
	some rule in blocked_patterns
	blocked_match(rule)
	msg = blocked_message(rule)
}

blocked_match(rule) if regex.match(rule.pattern, request_text)

# A view equal to one already searched is not searched again (`not a == b`:
# true when either side is undefined, unlike `a != b`).
blocked_match(rule) if {
	not detection_text == request_text
	regex.match(rule.pattern, detection_text)
}

blocked_match(rule) if {
	rule.ignore_spacing == true
	not compact_text == detection_text
	not compact_text == request_text
	regex.match(rule.pattern, compact_text)
}

# Some blocked pattern matched (the request is denied): its prompt is kept
# as a digest only (obligations.rego, prompt_logging).
blocked_content if {
	some denial in content_denials
	denial.code == "blocked_content"
}

blocked_message(rule) := sprintf("the request matches blocked content rule '%s': %s", [rule.id, rule.message]) if {
	is_string(rule.message)
} else := sprintf("the request matches blocked content rule '%s'", [rule.id])

# A pattern both engines evaluate alike: valid on both, and using none of
# the constructs on which regorus (Rust's regex) and OPA (Go's regexp)
# disagree. The load-time check (checks.rego) refuses data with any other.
usable_pattern(pattern) if {
	is_string(pattern)
	every construct in unportable_constructs {
		not regex.match(construct, pattern)
	}
	regex.is_valid(pattern)
}

# Written as patterns over the pattern's text. A backslash escape counts
# when an even number of backslashes precedes it.
unportable_constructs := {
	# \d \w \s \b and negations: Unicode on regorus, ASCII on OPA
	`(?:^|[^\\])(?:\\\\)*\\[dDwWsSbB]`,
	# flags other than i, m, s, U: (?x) and (?u) are valid only on regorus
	`\(\?[imsU-]*[A-OQ-TV-Za-hj-lnoqrt-z]`,
	# class set operations ([a-z&&[^x]], [a--b], [a~~b]): regorus only
	`\[[^\]]*(?:&&|--|~~)`,
	# {,n} is a literal on OPA and an error on regorus
	`\{,`,
	# repetition counts of 100 or more: above 1000 valid only on regorus, and
	# from about 120 (.{120}) too big for regorus, which then stops with an
	# error instead of answering is_valid
	`\{[0-9]*[0-9]{3}`,
	`,[0-9]*[0-9]{3}\}`,
}

# ---------------------------------------------------------------- detectors

# The configured detectors: name -> settings ({} when none).
# (as_list/as_object(setting(...)) spelled out here and below: each function
# call costs regorus more than the check.)
detectors := settings if {
	settings = object.get(config, ["content", "detectors"], null)
	is_object(settings)
} else := {}

# The action of a configured detector, when it is a known one.
detector_action(name) := action if {
	action = detectors[name].action
	action in detector_actions
}

# The configured detectors' actions by name. Every configured detector has a
# known action: the load-time check (checks.rego) refuses data without.
detector_actions_by_name := {name: settings.action | some name, settings in detectors}

# National id formats: {id, pattern} pairs. Every entry can run: the
# load-time check refuses data with one that cannot.
national_ids contains {"id": rule.id, "pattern": rule.pattern} if {
	rules = object.get(config, ["content", "national_ids"], null)
	is_array(rules)
	some rule in rules
}

# The national ids that can run, for the load-time check itself.
usable_national_ids contains {"id": rule.id, "pattern": rule.pattern} if {
	some rule in as_list(setting(["content", "national_ids"]))
	is_string(rule.id)
	not rule.id in builtin_detectors
	usable_pattern(rule.pattern)
}

# The prompt's findings: every configured detector run on the normalised
# view, overlaps settled (text_findings).
findings := text_findings(detection_text, detectors)

# ---------------------------------------------------------------- detection on a text

# Every finding in `text` (a normalised view) of the detectors `active` names
# (an object keyed by detector name), overlaps settled: the one detection both
# entry points run, on the prompt (findings) and on an output (output.rego).
# A number found by the broad phone or payment_card detectors inside a
# finding of another detector (an IBAN, an e-mail address, a national id) is
# part of that finding, not a finding of its own. Where a phone and a payment
# card cover the same text, it is a payment card.
text_findings(text, active) := {finding |
	some finding in raw
	not shadowed(finding, raw, covering)
} if {
	raw = raw_text_findings(text, active)

	# The texts that can hold a phone number or card of their own, joined: one
	# search over this skips the pairwise comparison for most findings.
	covering = concat("\n", [finding.text | some finding in raw; finding.detector != "phone"])
}

# Every finding, before overlaps are settled. Each built-in detector first
# asks a question far cheaper than its search and that every text it can find
# something in answers yes (on regorus a large pattern is compiled again on
# every call).
raw_text_findings(text, active) := ((email_findings(text, active) | number_findings(text, active)) | iban_findings(text, active)) | national_id_findings(text, active)

email_findings(text, active) := {{"detector": "email", "text": found} |
	active.email
	contains(text, "@")
	some found in pii.emails(text)
}

# A phone number has 9 to 15 digits, a card number 13 to 19: a text without
# nine digits holds neither.
number_findings(text, active) := phone_findings(text, active) | card_findings(text, active) if {
	regex.match(`[0-9](?:[^0-9]*[0-9]){8}`, text)
} else := set()

phone_findings(text, active) := {{"detector": "phone", "text": found} |
	active.phone
	some found in pii.phones(text)
}

card_findings(text, active) := {{"detector": "payment_card", "text": found} |
	active.payment_card
	some found in pii.payment_cards(text)
}

iban_findings(text, active) := {{"detector": "iban", "text": found} |
	active.iban
	regex.match(`[A-Z]{2}[0-9]{2}`, text)
	some found in pii.ibans(text)
}

national_id_findings(text, active) := {{"detector": rule.id, "text": found} |
	some rule in national_ids
	active[rule.id]
	some found in pii.pattern_matches(rule.pattern, text)
}

shadowed(finding, raw, covering) if {
	finding.detector in {"phone", "payment_card"}
	contains(covering, finding.text)
	some other in raw
	other.detector != finding.detector
	other.detector != "phone"
	contains(other.text, finding.text)
	covers(other, finding)
}

covers(other, finding) if count(other.text) > count(finding.text)

covers(_, finding) if finding.detector == "phone"

content_denials contains {"code": "pii_detected", "message": msg} if {
	some name in {finding.detector | some finding in findings}
	detector_actions_by_name[name] == "deny"
	found = count({finding | some finding in findings; finding.detector == name})
	msg = sprintf("the request contains personal data found by detector '%s' (%s found)", [name, format_int(found, 10)])
}
