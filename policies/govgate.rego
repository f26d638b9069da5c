# METADATA
# title: govgate usage policy
# description: |
#   Decides whether a principal may send a request to a model, and under which
#   obligations. Who may do what, when, how much and with which content lives
#   in data.govgate_config (data.json), so an operator changes the rules by
#   editing data, not these modules.
#
#   Entry points read by the gateway:
#     data.govgate.decision        {allow, reasons, obligations}
#     data.govgate.visible_models  names of input.models the principal may use
#     data.govgate.output_decision {allow, reasons, obligations: {redact}} on
#                                  generated text (output.rego)
#
#   The rules are split by concern, all in package govgate:
#     access.rego       roles and teams grant models (and the model list)
#     purpose.rego      restricted models need a declared purpose
#     schedule.rego     models open only at some hours or on some weekdays
#     limits.rego       max_tokens caps, and usage limits per principal and team
#     content.rego      blocked patterns and PII detectors on the prompt text
#     obligations.rego  priority, prompt logging, redaction and limits obligations
#     output.rego       the output decision: detectors on generated text, per role
#     checks.rego       malformed input denies, never crashes; unusable data
#                       is refused when the policy is loaded (config_problems)
#   with pure helpers in govgate.pii (detectors, Luhn, IBAN) and
#   govgate.calendar (UTC date arithmetic).
#
#   A denial is never inferred from a missing reason: allow must be proven, and
#   every denial carries at least one reason.
#
#   The gateway answers on regorus's compiled VM, checked against regorus's
#   interpreter; the two answer some valid Rego differently, and these
#   modules avoid it (README, "Policy"; docs/architecture.md, "What a
#   decision costs"; tests/policy/test_policy_vm.py, bench/policy_vm_fuzz.py):
#   - Rule bodies bind with `v = ref`, not `v := ref`: the VM binds an
#     undefined value with `:=`.
#   - No `else` follows a body that iterates (`some ... in`, `x[_]`): the VM
#     leaves the value undefined when such a body fails, in any clause, in
#     rules and functions. Rules use `default`; no function has a `default`
#     (the VM never falls back to one).
#   - A comprehension's or partial rule's head reads only what is defined
#     for every answer of its body (the VM adds an undefined head term to
#     the collection, the interpreter stops on one in a partial rule): the
#     heads here read fields the load-time check (checks.rego) makes sure
#     of, or bind them in the body.
#   - No argument that may be undefined goes to a function that takes it as
#     `_` (the VM calls the function anyway): such arguments are asked first.
#   - `some ... in` walks only a value known to be a collection (`is_array`
#     first, or as_list): on null, a string or a number regorus's
#     interpreter stops with an error where OPA and the VM find nothing, and
#     it evaluates every definition of a function or partial rule, so one
#     such walk fails the whole decision.
package govgate

import rego.v1

# The operator's data ({} when it is missing or not an object, which
# checks.rego reports).
config := c if {
	c = data.govgate_config
	is_object(c)
} else := {}

# The decision the gateway enforces, in the shape of the policy contract.
decision := {
	"allow": allow,
	"reasons": reasons,
	"obligations": obligations,
}

# What the gateway must do to a request it serves (obligations.rego,
# limits.rego), given on denials too: the audit entry of a denied request
# follows prompt_logging and redact.
obligations := {
	"max_tokens": granted_max_tokens,
	"priority": priority,
	"prompt_logging": prompt_logging,
	"redact": redact,
	"limits": limits_obligation,
}

# ---------------------------------------------------------------- allow

default allow := false

# A request is allowed when a role grants the model and nothing denies it.
allow if {
	model_permitted
	count(denials) == 0
}

# The reasons the modules find, each module in a set of its own (so that
# bench/policy.py can time each module's rules apart).
denials := ((((access_denials | purpose_denials) | schedule_denials) | limits_denials) | content_denials) | input_denials

# ---------------------------------------------------------------- reasons

# The reasons returned to the client: empty when allowed, never empty when
# denied (a denial no rule explains still says so).
reasons := [] if {
	allow
} else := sorted_denials if {
	count(denials) > 0
} else := [{"code": "denied", "message": "no policy rule allows this request"}]

# Denials ordered by code, then message. Sorting [code, message] pairs
# (arrays of strings) orders the same way on every engine; objects with
# different keys might not.
sorted_denials := [denial |
	some key in sort({[d.code, d.message] | some d in denials})
	some denial in denials
	[denial.code, denial.message] == key
]

# ---------------------------------------------------------------- settings

# Settings the data may leave out take these values.
builtin_defaults := {
	"max_tokens": 128,
	"max_tokens_mode": "clamp",
	"prompt_logging": "full",
	"priority": 5,
}

# The defaults in force: govgate_config.defaults as written in the data, over
# the built-in ones (one rule: each rule a decision evaluates costs regorus
# about as much as a dozen expressions).
defaults := object.union(builtin_defaults, d) if {
	d = config.defaults
	is_object(d)
} else := builtin_defaults

# ---------------------------------------------------------------- input

# The requested model's name; undefined when the input lacks it.
requested_model := input.model.name if is_string(input.model.name)

# The principal's team; undefined for a principal without one.
principal_team := input.principal.team if {
	is_string(input.principal.team)
	input.principal.team != ""
}

# Names for messages that exist even when the input lacks them, so that a
# malformed input still gets its reason. (Each rule a decision evaluates
# costs regorus about 5 µs, so a name used once is not a rule of its own.)
principal_label := id if {
	id = input.principal.id
	is_string(id)
} else := "(unknown)"

model_label := requested_model if {
	requested_model
} else := "(unknown)"

# ---------------------------------------------------------------- helpers

# `value` if it is a list, else the empty list: `some x in` on anything else
# is an error on regorus and undefined on OPA.
as_list(value) := value if {
	is_array(value)
} else := []

# `value` if it is an object, else the empty object.
as_object(value) := value if {
	is_object(value)
} else := {}

# A count, a cap or a limit: an integral number >= 0 that a float holds
# exactly. Beyond 2^53 the engines round and print numbers differently.
whole_number(value) if {
	countable(value)
	value == round(value)
}

# A number >= 0 and at most 2^53 - 1 (a counter may have a fraction).
countable(value) if {
	is_number(value)
	value >= 0
	value <= 9007199254740991
}

# The value at `path` in govgate_config, null when the data has none.
setting(path) := object.get(config, path, null)

# The strings of a list, sorted and joined for a message.
listing(values) := "(none)" if {
	count(strings_of(values)) == 0
} else := concat(", ", sort(strings_of(values)))

strings_of(values) := {v | some v in values; is_string(v)} if {
	listable(values)
} else := set()

listable(values) if is_array(values)

listable(values) if is_set(values)
