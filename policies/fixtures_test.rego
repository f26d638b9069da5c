# Shared fixtures for the Rego unit tests (no tests of its own).
#
# Most tests evaluate the policy on the `config` below instead of data.json,
# so that an operator editing data.json cannot break them; the
# shipped_config tests in govgate_test.rego check the data.json that ships.
package govgate_test.fixtures

import rego.v1

config := {
	"defaults": {"max_tokens": 128, "max_tokens_mode": "clamp", "prompt_logging": "full", "priority": 5},
	"roles": {
		"admin": {"models": ["*"], "max_tokens": 4096, "priority": 2},
		"analyst": {"models": ["govgate-tiny"], "max_tokens": 256},
		"viewer": {"models": []},
		"intern": {"models": ["govgate-tiny"]},
		"counsel": {"models": ["govgate-tiny", "big"], "max_tokens": 512, "prompt_logging": "hash"},
		"hr": {"models": [], "prompt_logging": "redacted"},
		"translator": {"models": ["big"], "max_tokens": 2048},
		"batch": {"models": ["govgate-tiny", "big"], "max_tokens": 1000, "max_tokens_mode": "deny", "priority": 8},
		"oncall": {"models": ["govgate-tiny"], "max_tokens": 64, "priority": 0},
	},
	"teams": {
		"support": {"models": ["govgate-tiny"]},
		"research": {"models": ["*"]},
		"open": {},
		"small": {},
	},
	"models": {
		"night": {"hours_utc": [22, 6]},
		"office": {"hours_utc": [8, 18], "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]},
		"legal": {"purposes": ["litigation"]},
	},
	"purposes": {"required_for_tags": ["restricted"], "allowed": ["research", "evaluation"]},
	"limits": {
		"principals": {
			"default": {
				"requests_per_minute": 60,
				"tokens_per_minute": 10000,
				"tokens_per_day": 100000,
				"tokens_per_month": 1000000,
				"in_flight": 4,
			},
			"u-vip": {"requests_per_minute": 1000, "tokens_per_day": 10000000},
		},
		"teams": {
			"default": {"requests_per_minute": 600},
			"small": {"requests_per_minute": 100, "tokens_per_day": 5000, "in_flight": 2},
		},
	},
	"content": {
		"blocked_patterns": [{
			"id": "private_key",
			"pattern": `(?i)-{3,} ?BEGIN[A-Z ]*PRIVATE ?KEY[A-Z ]*-{3,}`,
			"ignore_spacing": true,
			"message": "private keys must not be sent",
		}],
		"national_ids": [{"id": "us_ssn", "pattern": `[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}`}],
		"detectors": {
			"email": {"action": "redact"},
			"phone": {"action": "redact"},
			"payment_card": {"action": "deny"},
			"iban": {"action": "redact"},
			"us_ssn": {"action": "deny"},
		},
	},
}

# A chat request by analyst u-1 of team t-1 for govgate-tiny, on Tuesday
# 2023-11-14 at 22:13:20 UTC, with no usage counters.
base_input := {
	"principal": {"id": "u-1", "team": "t-1", "roles": ["analyst"], "key_id": "k-1"},
	"request": {
		"endpoint": "chat.completions",
		"model": "govgate-tiny",
		"messages": [{"role": "user", "content": "hi"}],
		"text": "hi",
		"max_tokens": 100,
		"stream": false,
		"purpose": null,
	},
	"model": {"name": "govgate-tiny", "family": "llama", "context_length": 256, "tags": []},
	"time": {"now_ns": 1700000000000000000, "hour_utc": 22, "weekday": "Tuesday"},
}

# The base input with `overrides` merged in (objects merge, other values replace).
input_with(overrides) := object.union(base_input, overrides)

# The decision on the base input with `overrides`, under the fixture config.
decide(overrides) := d if {
	d := data.govgate.decision with input as input_with(overrides)
		with data.govgate_config as config
}

# The decision for a principal holding `roles` asking `model` for `max_tokens`.
decide_as(roles, model, max_tokens) := decide({
	"principal": {"roles": roles},
	"request": {"model": model, "max_tokens": max_tokens},
	"model": {"name": model},
})

# Overrides that ask for `model` with `tags`.
model_request(model, tags) := {
	"request": {"model": model},
	"model": {"name": model, "tags": tags},
}

# Overrides that set the prompt text.
text_request(text) := {"request": {"text": text}}

# Overrides that set the prompt text and its normalised view, as the
# gateway's gateway/normalize.py spells it.
normalized_request(text, normalized) := {"request": {"text": text, "normalized_text": normalized}}

# The problems the load-time check finds in the fixture config with
# `overrides` merged in (a policy with any is refused at load).
config_problems_with(overrides) := problems if {
	problems := data.govgate.config_problems with data.govgate_config as object.union(config, overrides)
}

# The set of reason codes of a decision.
codes(d) := {r.code | some r in d.reasons}

# The reasons of a decision with the given code.
reasons_with_code(d, code) := [r | some r in d.reasons; r.code == code]
