# Output rules. Decides what happens to text a model generated: let it through, mask
# findings in it (redact), or end the completion (stop). The gateway asks
# once on the whole output of a plain completion, and on a sliding window
# of a streamed one; see README "Output rules".
#
# Entry point read by the gateway:
#   data.govgate.output_decision  {allow, reasons, obligations: {redact, log_redact}}
#
# The input: principal and model as in the request's input, the request
# (endpoint, model, purpose, stream, max_tokens), the request's decision
# (allow, obligations with redact reduced to detector names) and the output
# window: text, normalized_text, offset (characters of output before the
# window) and final (the window reaches the end of the output).
#
# The data (govgate_config.content.output) gives each detector an action,
# allow, redact or stop; a detector is a built-in one (email, phone,
# payment_card, iban), a national id (content.national_ids) or a blocked
# pattern (content.blocked_patterns: allow or stop only, as a pattern's
# match is no finding to mask). The detection is the prompt's
# (content.rego text_findings); roles may set their own action per
# detector (output_actions says how they combine).
package govgate

import rego.v1

# The output decision, in the shape of the policy contract. allow false
# means stop; the reasons are then never empty. redact lists the findings of
# the detectors whose action is not allow: on an allowed output those to
# mask (a stop detector found nothing); on a stopped one all of them, so the
# audit entry of what was generated keeps none in clear. log_redact lists,
# when the request's prompt_logging is "redacted", the findings of the
# detectors whose action is allow: the client receives them, the audit's
# copy masks them, as it masks every finding of the prompt.
output_decision := {
	"allow": output_allow,
	"reasons": output_reasons,
	"obligations": {"redact": output_redact, "log_redact": output_log_redact},
}

default output_allow := false

output_allow if count(output_stops) == 0

output_reasons := [] if {
	output_allow
} else := [stop |
	some key in sort({[s.code, s.message] | some s in output_stops})
	some stop in output_stops
	[stop.code, stop.message] == key
]

output_redact := [{"detector": detector, "text": text} |
	some [detector, text] in sort({[finding.detector, finding.text] | some finding in output_findings; output_actions[finding.detector] != "allow"})
]

# An email an admin may receive (action allow) was kept in clear in the
# audit of a request logged "redacted" (probe s55): that level masks every
# finding the detectors make, whatever the client may see.
output_log_redact := [{"detector": detector, "text": text} |
	input.decision.obligations.prompt_logging == "redacted"
	some [detector, text] in sort({[finding.detector, finding.text] | some finding in output_findings; output_actions[finding.detector] == "allow"})
]

# ---------------------------------------------------------------- input

# The output window; undefined when the input lacks it (a stop, below).
output_text := input.output.text if is_string(input.output.text)

# The normalised view (gateway/requests/normalize.py), or the text itself
# for an input written without one.
output_view := input.output.normalized_text if {
	is_string(input.output.normalized_text)
} else := output_text

output_input_problems contains "input.output.text must be a string" if not output_text

output_input_problems contains "input.output.normalized_text must be a string" if {
	value = input.output.normalized_text
	not is_string(value)
}

# ---------------------------------------------------------------- settings

output_actions_allowed := {"allow", "redact", "stop"}

# From the most permissive action to the strictest.
output_action_order := ["allow", "redact", "stop"]

output_rank := {"allow": 0, "redact": 1, "stop": 2}

output_settings := settings if {
	settings = object.get(config, ["content", "output"], null)
	is_object(settings)
} else := {}

# Each configured detector's action for everybody. The load-time check
# (checks.rego) gives every entry a known action.
output_default_actions := {name: entry.action |
	some name, entry in as_object(output_settings.detectors)
}

# The per-role actions of the principal's roles, as [detector, action] pairs.
output_role_pairs := {[name, action] |
	some role in as_list(input.principal.roles)
	is_string(role)
	settings = output_settings.roles[role]
	some name, action in settings
}

# Each detector's action for this principal: among the principal's roles
# that set one, the most permissive; else the detector's own. Role entries
# grant, as models do: holding one more role never takes away what another
# grants. A role that is stricter than the default is set by giving it a
# stricter action, and holds unless another role of the same person grants
# more.
output_actions := object.union(output_default_actions, {name: output_action_order[rank] |
	some [name, _] in output_role_pairs
	rank = min({output_rank[action] | some [other, action] in output_role_pairs; other == name})
})

# ---------------------------------------------------------------- findings

# Every configured detector runs (an allowed one too), so overlaps settle
# as on the prompt (an IBAN's digits are no phone number even where ibans
# are allowed); output_redact and output_stops keep those that act.
output_findings := found if {
	found = text_findings(output_view, output_actions)
} else := set()

output_stops contains {"code": "output_pii_detected", "message": msg} if {
	some name in {finding.detector | some finding in output_findings}
	output_actions[name] == "stop"
	found = count({finding | some finding in output_findings; finding.detector == name})
	msg = sprintf("the output contains personal data found by detector '%s' (%s found)", [name, format_int(found, 10)])
}

output_stops contains {"code": "output_blocked_content", "message": msg} if {
	some rule in blocked_patterns
	output_actions[rule.id] == "stop"
	pattern_in_text(rule, output_text, output_view)
	msg = sprintf("the output matches blocked content rule '%s'", [rule.id])
}

output_stops contains {"code": "invalid_input", "message": msg} if some msg in output_input_problems

# A blocked pattern matches the text, its normalised view or (with
# ignore_spacing) that view without spaces and line breaks, as on the prompt
# (content.rego blocked_match).
pattern_in_text(rule, text, _) if regex.match(rule.pattern, text)

pattern_in_text(rule, text, view) if {
	view != text
	regex.match(rule.pattern, view)
}

pattern_in_text(rule, text, view) if {
	rule.ignore_spacing == true
	compact = replace(replace(view, " ", ""), "\n", "") # as content.rego's compact_text
	compact != view
	compact != text
	regex.match(rule.pattern, compact)
}
