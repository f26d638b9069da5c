# Malformed input and unusable data.
#
# The gateway builds the input and an operator writes the data; either can
# be wrong. A malformed input field must deny with invalid_input, naming the
# field, rather than pass silently or stop the engine.
#
# The data is checked once, when a policy is loaded, not on every decision:
# config_problems depends on the data alone, and the gateway evaluates it
# when it loads or reloads the policy (the embedded evaluators and an OPA
# server alike) and refuses a policy for which it is not empty, naming each
# problem (config_error). The decision rules can therefore rely on data that
# passed these checks.
package govgate

import rego.v1

input_denials contains {"code": "invalid_input", "message": msg} if some msg in input_problems

# ---------------------------------------------------------------- input

# The fields of input.usage.<scope>: the limits' counters and when the minute window frees.
usage_counters := {check.counter | some check in usage_checks} | {"minute_window_frees_in_s"}

input_problems contains "input.request.max_tokens must be a whole number from 1 to 2^53" if not requested_max_tokens

input_problems contains "input.request.text must be a string" if not request_text

input_problems contains "input.request.normalized_text must be a string" if {
	value = input.request.normalized_text
	not is_string(value)
}

input_problems contains "input.request.purpose must be a string or null" if {
	purpose = input.request.purpose
	purpose != null
	not is_string(purpose)
}

input_problems contains "input.principal.team must be a string or null" if {
	team = input.principal.team
	team != null
	not is_string(team)
}

input_problems contains "input.model.tags must be a list" if {
	tags = input.model.tags
	not is_array(tags)
}

input_problems contains "input.usage must be an object or null" if {
	usage = input.usage
	usage != null
	not is_object(usage)
}

input_problems contains sprintf("input.usage.%s must be an object or null", [scope]) if {
	some scope in ["principal", "team"]
	counters = input.usage[scope]
	counters != null
	not is_object(counters)
}

input_problems contains sprintf("input.usage.%s.%s must be a number from 0 to 2^53", [scope, counter]) if {
	some scope in ["principal", "team"]
	counters = input.usage[scope]
	is_object(counters)

	# Not the usual case: limits.rego's one pass over the counters (counted_usage)
	# kept them all.
	count(counted_usage[scope]) != count(counters)
	some counter in usage_counters
	value = counters[counter] # one variable per lookup: regorus is slow on x[a][b]
	not countable(value)
}

# ---------------------------------------------------------------- data

# Every problem of the data, for every role, team, model and limits entry
# (not only those one request touches): evaluated once per load.
config_problems contains "govgate_config must be an object" if {
	c = data.govgate_config
	not is_object(c)
}

# Missing altogether (no data.json, or one without the key): govgate.rego's
# `config` would be {}, every role unknown and every limit lifted.
config_problems contains "govgate_config is missing: the policy's data (data.json) must define it" if not config_defined

config_defined if {
	c = data.govgate_config
	c == c
}

# A section of the wrong type would read as empty (as_object), silently
# dropping its roles, teams or limits rather than refusing the data.
config_problems contains sprintf("govgate_config.%s must be an object or null", [key]) if {
	some key in ["defaults", "roles", "teams", "models", "limits", "purposes", "content"]
	value = setting([key])
	value != null
	not is_object(value)
}

config_problems contains sprintf("govgate_config.limits.%s must be an object or null", [kind]) if {
	some kind in ["principals", "teams"]
	value = setting(["limits", kind])
	value != null
	not is_object(value)
}

# `limits` holds only these two: a misspelled `principal` was ignored, and
# every principal was left with no limits at all (fail open on a typo).
config_problems contains sprintf("govgate_config.limits has an unknown key %s (known: principals, teams)", [key]) if {
	some key, _ in as_object(setting(["limits"]))
	not key in {"principals", "teams"}
}

# Every other object of the data holds only the keys the rules read: a
# misspelled one (`limit` for `limits`, `hours` for `hours_utc`,
# `max_token`, `prompt_loging`, `blocked_pattern`) was ignored, its setting
# left at the default or lifted without a word (probe p3; the `limits` and
# team checks above and below say the same for those).
section_keys := {
	"": {"defaults", "roles", "teams", "models", "limits", "purposes", "content"},
	"defaults": {"max_tokens", "max_tokens_mode", "prompt_logging", "priority"},
	"purposes": {"required_for_tags", "allowed"},
	"content": {"blocked_patterns", "national_ids", "detectors", "output"},
	"content.output": {"detectors", "roles"},
}

config_problems contains sprintf("govgate_config has an unknown key %s (known: %s)", [key, concat(", ", sort(section_keys[""]))]) if {
	some key, _ in as_object(data.govgate_config)
	not key in section_keys[""]
}

config_problems contains sprintf("govgate_config.%s has an unknown key %s (known: %s)", [section, key, concat(", ", sort(known))]) if {
	some section, known in section_keys
	section != ""
	some key, _ in as_object(setting(split(section, ".")))
	not key in known
}

# A role's settings: the defaults' keys, and the models it grants.
role_setting_names := section_keys.defaults | {"models"}

config_problems contains sprintf("govgate_config.roles.%s has an unknown setting %s (known: %s)", [role, key, concat(", ", sort(role_setting_names))]) if {
	some role, settings in as_object(setting(["roles"]))
	some key, _ in as_object(settings)
	not key in role_setting_names
}

# A model's settings: its schedule and its purposes.
model_setting_names := {"hours_utc", "weekdays", "purposes"}

config_problems contains sprintf("govgate_config.models.%s has an unknown setting %s (known: %s)", [model, key, concat(", ", sort(model_setting_names))]) if {
	some model, settings in as_object(setting(["models"]))
	some key, _ in as_object(settings)
	not key in model_setting_names
}

# How each role setting must look.
setting_rules := {
	"max_tokens": "a whole number >= 0",
	"max_tokens_mode": "\"clamp\" or \"deny\"",
	"prompt_logging": "\"full\", \"redacted\" or \"hash\"",
	"priority": "a whole number from 0 to 9",
}

valid_setting("max_tokens", value) if whole_number(value)

valid_setting("max_tokens_mode", value) if value in {"clamp", "deny"}

valid_setting("prompt_logging", value) if value in prompt_logging_levels

valid_setting("priority", value) if valid_priority(value)

config_problems contains sprintf("govgate_config.defaults.%s must be %s", [name, rule]) if {
	some name, rule in setting_rules
	value = defaults[name]
	not valid_setting(name, value)
}

# The roles a principal can hold (access.rego ignores an entry that is not an object).
configured_roles := {role: settings |
	some role, settings in as_object(config.roles)
	is_object(settings)
}

config_problems contains sprintf("govgate_config.roles.%s.%s must be %s", [role, name, rule]) if {
	some role, settings in configured_roles
	some name, rule in setting_rules
	value = settings[name]
	not valid_setting(name, value)
}

config_problems contains sprintf("govgate_config.roles.%s.models must be a list", [role]) if {
	some role, settings in configured_roles
	models = settings.models
	not is_array(models)
}

config_problems contains sprintf("govgate_config.teams.%s.models must be a list or null", [team]) if {
	some team, settings in as_object(setting(["teams"]))
	models = as_object(settings).models
	models != null
	not is_array(models)
}

# A team's fair share of a model's workers (README, "Fair share"): a number
# greater than 0 and at most 1000 (null or absent: the `default` entry's
# share, else 1). The gateway publishes the weights to Redis as it loads the
# policy; the decision rules never read them.
config_problems contains sprintf("govgate_config.teams.%s.share must be a number from 0.001 to 1000, or null", [team]) if {
	some team, settings in as_object(setting(["teams"]))
	share = as_object(settings).share
	share != null
	not valid_share(share)
}

# At least 0.001: a share of 1e-300 pushed the fair queue's virtual time past
# what a float adds to (every other team's tags stopped moving), which no
# later fix of the data undid (probe h8).
valid_share(value) if {
	is_number(value)
	value >= 0.001
	value <= 1000
}

# A team entry is an object of these settings, or null. An entry of another
# type read as {} (no models restriction, share 1), and a misspelled key
# (`shares`, `model`) left its setting at the default without a word.
team_setting_names := {"models", "share"}

config_problems contains sprintf("govgate_config.teams.%s must be an object or null", [team]) if {
	some team, settings in as_object(setting(["teams"]))
	settings != null
	not is_object(settings)
}

config_problems contains sprintf("govgate_config.teams.%s has an unknown setting %s (known: %s)", [team, key, concat(", ", sort(team_setting_names))]) if {
	some team, settings in as_object(setting(["teams"]))
	is_object(settings)
	some key, _ in settings
	not key in team_setting_names
}

# The settings of every model the data names.
configured_models := {name: as_object(settings) | some name, settings in as_object(setting(["models"]))}

config_problems contains sprintf("govgate_config.models.%s.hours_utc must be [start, end] in whole hours from 0 to 24", [name]) if {
	some name, settings in configured_models
	window = settings.hours_utc
	window != null
	not valid_hours_window(window)
}

config_problems contains sprintf("govgate_config.models.%s.weekdays must be a list of day names (Monday ... Sunday)", [name]) if {
	some name, settings in configured_models
	days = settings.weekdays
	days != null
	not valid_weekdays(days)
}

config_problems contains sprintf("govgate_config.models.%s.purposes must be a list of strings or null", [name]) if {
	some name, settings in configured_models
	purposes = settings.purposes
	purposes != null
	not string_list(purposes)
}

config_problems contains sprintf("govgate_config.purposes.%s must be a list of strings", [key]) if {
	some key in ["allowed", "required_for_tags"]
	value = setting(["purposes", key])
	value != null
	not string_list(value)
}

string_list(value) if {
	is_array(value)
	every item in value {
		is_string(item)
	}
}

# Every limits entry (see limits.rego), the default ones included.
config_problems contains sprintf("govgate_config.limits.%s.%s must be an object", [kind, name]) if {
	some kind in ["principals", "teams"]
	some name, entry in as_object(setting(["limits", kind]))
	entry != null
	not is_object(entry)
}

# Named by entry and limit: two bad entries are two problems, each findable.
config_problems contains sprintf("govgate_config.limits.%s.%s.%s must be a whole number >= 0 or null", [kind, name, limit]) if {
	some kind in ["principals", "teams"]
	some name, entry in as_object(setting(["limits", kind]))
	is_object(entry)
	some limit in limit_names
	value = entry[limit]
	value != null
	not whole_number(value)
}

# A misspelled limit ("request_per_minute") was ignored, and since an entry
# replaces the default whole, the principal or team had no limit at all.
config_problems contains sprintf("govgate_config.limits.%s.%s has an unknown limit %s (known: %s)", [kind, name, key, concat(", ", limit_names)]) if {
	some kind in ["principals", "teams"]
	some name, entry in as_object(setting(["limits", kind]))
	is_object(entry)
	some key, _ in entry
	not key in limit_names
}

# ---------------------------------------------------------------- content data

config_problems contains "govgate_config.content.blocked_patterns must be a list" if {
	value = setting(["content", "blocked_patterns"])
	value != null
	not is_array(value)
}

config_problems contains sprintf("govgate_config.content.blocked_patterns[%d] needs a string id and a usable pattern", [i]) if {
	some i, rule in blocked_patterns
	not usable_id_and_pattern(rule)
}

config_problems contains sprintf("govgate_config.content.blocked_patterns[%d].ignore_spacing must be true or false", [i]) if {
	some i, rule in blocked_patterns
	spacing_problem(rule)
}

config_problems contains "govgate_config.content.national_ids must be a list" if {
	value = setting(["content", "national_ids"])
	value != null
	not is_array(value)
}

config_problems contains sprintf("govgate_config.content.national_ids[%d] needs a string id (not a built-in detector's name) and a usable pattern", [i]) if {
	some i, rule in as_list(setting(["content", "national_ids"]))
	not usable_national_id(rule)
}

config_problems contains sprintf("govgate_config.content.national_ids has the id '%s' more than once", [id]) if {
	ids = [rule.id | some rule in as_list(setting(["content", "national_ids"]))]
	some id in {candidate | some candidate in ids; is_string(candidate)}
	count([other | some other in ids; other == id]) > 1
}

config_problems contains "govgate_config.content.detectors must be an object" if {
	value = setting(["content", "detectors"])
	value != null
	not is_object(value)
}

config_problems contains sprintf("govgate_config.content.detectors.%s names no detector (built-in: %s; or a national_ids id)", [name, listing(builtin_detectors)]) if {
	some name, _ in detectors
	not name in builtin_detectors
	not name in {rule.id | some rule in usable_national_ids}
}

config_problems contains sprintf("govgate_config.content.detectors.%s.action must be \"deny\" or \"redact\"", [name]) if {
	some name, _ in detectors
	not detector_action(name)
}

usable_content_rule(rule) if {
	usable_id_and_pattern(rule)
	not spacing_problem(rule)
}

spacing_problem(rule) if {
	value = rule.ignore_spacing
	not is_boolean(value)
}

usable_id_and_pattern(rule) if {
	is_string(rule.id)
	usable_pattern(rule.pattern)
}

usable_national_id(rule) if {
	usable_id_and_pattern(rule)
	not rule.id in builtin_detectors
}

# ---------------------------------------------------------------- output rules data

# The names an output action may be set for: the built-in detectors, the
# national ids and the blocked patterns.
output_detector_names := (builtin_detectors | {rule.id | some rule in usable_national_ids}) | {rule.id | some rule in blocked_patterns; is_string(rule.id)}

blocked_pattern_ids := {rule.id | some rule in blocked_patterns; is_string(rule.id)}

config_problems contains "govgate_config.content.output must be an object" if {
	value = setting(["content", "output"])
	value != null
	not is_object(value)
}

config_problems contains sprintf("govgate_config.content.output.%s must be an object", [key]) if {
	some key in ["detectors", "roles"]
	value = setting(["content", "output", key])
	value != null
	not is_object(value)
}

config_problems contains sprintf("govgate_config.content.output.detectors.%s must be {\"action\": \"allow\", \"redact\" or \"stop\"}", [name]) if {
	some name, entry in as_object(setting(["content", "output", "detectors"]))
	not output_action_setting(entry)
}

config_problems contains sprintf("govgate_config.content.output.roles.%s must be an object of detector names and actions", [role]) if {
	some role, actions in as_object(setting(["content", "output", "roles"]))
	not is_object(actions)
}

config_problems contains sprintf("govgate_config.content.output.roles.%s.%s must be \"allow\", \"redact\" or \"stop\"", [role, name]) if {
	some role, actions in as_object(setting(["content", "output", "roles"]))
	some name, action in as_object(actions)
	not action in output_actions_allowed
}

config_problems contains sprintf("govgate_config.content.output.%s names no detector (built-in: %s; or a national_ids or blocked_patterns id)", [where, listing(builtin_detectors)]) if {
	some where, name in output_configured_names
	not name in output_detector_names
}

config_problems contains sprintf("govgate_config.content.output.%s: a blocked pattern's action is \"allow\" or \"stop\" (a pattern's match is no finding to mask)", [where]) if {
	some where, name in output_configured_names
	name in blocked_pattern_ids
	output_configured_action[where] == "redact"
}

config_problems contains sprintf("govgate_config.content.output: '%s' is both a national id and a blocked pattern", [name]) if {
	some name in blocked_pattern_ids
	name in {rule.id | some rule in usable_national_ids}
	name in {configured | some _, configured in output_configured_names}
}

# Where each name is set ("detectors.<name>" or "roles.<role>.<name>") -> the name.
output_configured_names[sprintf("detectors.%s", [name])] := name if {
	some name, _ in as_object(setting(["content", "output", "detectors"]))
}

output_configured_names[sprintf("roles.%s.%s", [role, name])] := name if {
	some role, actions in as_object(setting(["content", "output", "roles"]))
	some name, _ in as_object(actions)
}

# (The action bound in the body, not read in the head: an entry without one
# would give the rule an undefined value, on which regorus's interpreter
# stops the whole check and its VM puts "<undefined>" in the object.)
output_configured_action[sprintf("detectors.%s", [name])] := action if {
	some name, entry in as_object(setting(["content", "output", "detectors"]))
	is_object(entry)
	action = entry.action
}

output_configured_action[sprintf("roles.%s.%s", [role, name])] := action if {
	some role, actions in as_object(setting(["content", "output", "roles"]))
	some name, action in as_object(actions)
}

output_action_setting(entry) if {
	is_object(entry)
	object.keys(entry) == {"action"}
	entry.action in output_actions_allowed
}

# A role that grants models with a max_tokens cap of 0 under "clamp" allows
# every request with max_tokens 0, which serves nothing and which the gateway
# refuses as a policy_error: the start and every reload refused it in their
# trial, far from the data (probe q3 F6). To suspend a role, grant it no
# models, or make its mode "deny" (an ordinary max_tokens_exceeded denial).
config_problems contains sprintf("govgate_config.roles.%s.max_tokens is 0 with max_tokens_mode \"clamp\"%s: every request would be allowed 0 tokens; to suspend the role use \"models\": [] or max_tokens_mode \"deny\"", [role, inherited]) if {
	some role, settings in configured_roles
	effective = object.union(defaults, settings)
	effective.max_tokens == 0
	effective.max_tokens_mode == "clamp"
	is_array(settings.models)
	count(settings.models) > 0
	inherited = cap_origin(settings)
}

cap_origin(settings) := "" if "max_tokens" in object.keys(settings)
else := " (from defaults)"
