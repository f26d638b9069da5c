# Obligations (assembled in govgate.rego).
#
# What the gateway must do to a request it serves: queue it at a priority,
# store the prompt only as far as prompt_logging allows (with the listed
# findings redacted), and hold the principal and its team to their usage
# limits. The max_tokens cap is in limits.rego.
package govgate

import rego.v1

# ---------------------------------------------------------------- priority

# 0 is the most urgent, 9 the least (Celery on Redis).
valid_priority(value) if {
	whole_number(value)
	value <= 9
}

# The most urgent priority among the roles that grant the model: holding one
# more role should never slow a principal down; the default one when no role
# grants it. Every priority in the data is valid: the load-time check
# (checks.rego) refuses data with one that is not.
priority := min(priorities) if {
	priorities = {known_role_settings[role].priority | some role in granting}
	count(priorities) > 0
} else := defaults.priority

# ---------------------------------------------------------------- prompt logging

prompt_logging_levels := {"full", "redacted", "hash"}

# Logging levels of all the principal's known roles (not only those granting
# the model) so that a denied request is logged as the person's roles ask;
# the default level for a principal without one. Every level is a known one:
# the load-time check (checks.rego) refuses data with another.
logging_levels := {settings.prompt_logging | some settings in known_role_settings} if {
	count(known_roles) > 0
} else := {defaults.prompt_logging}

# The most private level wins: a role set to redact or hash prompts exists
# to protect what its holders type, and a second role must not undo that.
# Text a blocked pattern matched makes it "hash": such a rule guards a secret
# (a private key) that must not sit in the audit log, and a mask could not be
# trusted to find every spelling the rule matches (its normalised and
# spaceless views). Personal data found in the prompt makes "full" into
# "redacted".
prompt_logging := "hash" if {
	"hash" in logging_levels
} else := "hash" if {
	blocked_content
} else := "redacted" if {
	"redacted" in logging_levels
} else := "redacted" if {
	count(findings) > 0
} else := "full"

# ---------------------------------------------------------------- redact

# The texts the gateway must not store, with the detector that found them,
# sorted by detector then text. On an allowed request these are the findings
# of "redact" detectors; a denied request lists "deny" findings too, so that
# its audit entry does not keep them either.
redact := [{"detector": detector, "text": text} |
	some [detector, text] in sort({[finding.detector, finding.text] | some finding in findings})
]

# ---------------------------------------------------------------- limits

# The limits the gateway enforces when it reserves capacity; the team's is
# null for a principal without a team.
limits_obligation := {
	"principal": scope_limits.principal,
	"team": object.get(scope_limits, "team", null),
}
