# Token caps and usage limits.
#
# The max_tokens cap of the roles that grant the model, clamped or enforced
# as the roles' max_tokens_mode says, and the usage limits of the principal
# and of its team (govgate_config.limits) checked against the counters the
# gateway read (input.usage). The gateway enforces the same limits
# atomically when it reserves capacity; this check explains a denial and
# says when to retry.
package govgate

import rego.v1

import data.govgate.calendar

# ---------------------------------------------------------------- max_tokens

# The request's max_tokens; undefined when it is not a whole number >= 1
# (checks.rego reports that).
# (whole_number() spelled out: two nested function calls cost more than the
# checks on every decision.)
requested_max_tokens := n if {
	n = input.request.max_tokens
	is_number(n)
	n >= 1
	n <= 9007199254740991
	n == round(n)
}

# The most generous cap among the roles that grant the model: holding one
# more role should never take tokens away.
# Every cap is a whole number: the load-time check (checks.rego) refuses
# data with one that is not.
token_cap := max({known_role_settings[role].max_tokens | some role in granting})

# "clamp" when any granting role clamps (the more permissive mode), else
# "deny": a request asking for more than the cap is refused.
# (A default, not `else`: regorus's VM leaves a rule undefined when the body
# before an `else` fails in a `some ... in` statement.)
default max_tokens_mode := "deny"

max_tokens_mode := "clamp" if {
	some role in granting
	known_role_settings[role].max_tokens_mode == "clamp"
}

# The request's max_tokens, clamped to the cap. 0 when no role grants the
# model (the request is denied then and the value is never used).
default granted_max_tokens := 0

granted_max_tokens := min({requested_max_tokens, token_cap})

# (The cap first: max_tokens_mode walks the granting roles again, and most
# requests stay under the cap.)
limits_denials contains {"code": "max_tokens_exceeded", "message": msg} if {
	requested_max_tokens > token_cap
	max_tokens_mode == "deny"
	msg = sprintf(
		"max_tokens %s is above the cap of %s for model '%s' of principal '%s'",
		[format_int(requested_max_tokens, 10), format_int(token_cap, 10), model_label, principal_label],
	)
}

# ---------------------------------------------------------------- usage limits

# What each limit counts, what a request adds to it, the reason it gives and
# the window that decides when to retry. The gateway declares the same list
# in gateway/limits/catalogue.py; tests/test_limits_catalogue.py compares them.
usage_checks := [
	{"limit": "requests_per_minute", "counter": "requests_last_minute", "cost": "request", "code": "rate_limited", "window": "minute"},
	{"limit": "tokens_per_minute", "counter": "tokens_last_minute", "cost": "tokens", "code": "rate_limited", "window": "minute"},
	{"limit": "tokens_per_day", "counter": "tokens_today", "cost": "tokens", "code": "budget_exceeded", "window": "day"},
	{"limit": "tokens_per_month", "counter": "tokens_this_month", "cost": "tokens", "code": "budget_exceeded", "window": "month"},
	{"limit": "in_flight", "counter": "in_flight", "cost": "request", "code": "too_many_in_flight", "window": "in_flight"},
]

limit_names := [check.limit | some check in usage_checks]

# How the counters read in a message.
counter_phrases := {
	"requests_last_minute": "requests in the last minute",
	"tokens_last_minute": "tokens in the last minute",
	"tokens_today": "tokens today",
	"tokens_this_month": "tokens this month",
	"in_flight": "requests in flight",
}

# The limits entry for a principal or team: its own entry when the data has
# one, else the `default` entry, else none ({}: unlimited). An own entry
# replaces the default as a whole: a key it leaves out is unlimited.
limits_entry(kind, name) := entry if {
	entry = object.get(config, ["limits", kind, name], null)
	is_object(entry)
} else := entry if {
	entry = object.get(config, ["limits", kind, "default"], null)
	is_object(entry)
} else := {}

# The five limits of an entry, each a whole number or null (unlimited): the
# load-time check (checks.rego) lets no other value through, so the entry's
# own values need no check here.
limits_in_effect(entry) := object.union(unlimited, object.filter(entry, unlimited))

# Written out (limits_test.rego holds its keys equal to limit_names).
unlimited := {
	"requests_per_minute": null,
	"tokens_per_minute": null,
	"tokens_per_day": null,
	"tokens_per_month": null,
	"in_flight": null,
}

# The limits that bind this request, by scope ("team" for a principal with
# a team). A team's limits bind each member whatever the member's own limits
# are. (One rule, not one per scope: regorus's RVM compiler takes no partial
# object rule with constant keys; see bench/policy_rvm.py.)
scope_limits := {"principal": principal_limits, "team": limits_in_effect(limits_entry("teams", principal_team))} if {
	principal_team
} else := {"principal": principal_limits}

principal_limits := limits_in_effect(limits_entry("principals", principal_label))

scope_label("principal") := sprintf("principal '%s'", [principal_label])

scope_label("team") := sprintf("team '%s'", [principal_team])

# The usage snapshot's counters by scope, without those that do not count
# (a malformed counter counts as 0; checks.rego reports it). A counter the
# input lacks counts as 0 too.
# (countable() spelled out: a function call per counter costs more than the
# check.) checks.rego compares its size with the input's, rather than make a
# second pass over the counters.
counted_usage[scope] := {counter: value |
	some counter, value in counters
	is_number(value)
	value >= 0
	value <= 9007199254740991
} if {
	some scope in ["principal", "team"]
	counters = input.usage[scope]
	is_object(counters)
}

# What the request adds to a counter, by the check's `cost`.
request_costs := {"request": 1, "tokens": granted_max_tokens}

request_cost(cost) := request_costs[cost]

cost_phrase("request") := "1 request"

# The policy checks a token limit against max_tokens (after the clamp) alone: it does not count the
# prompt. The reservation that follows holds the prompt's tokens too, and the message says so.
cost_phrase("tokens") := sprintf("%s tokens for max_tokens, plus its prompt's", [format_int(granted_max_tokens, 10)])

# usage_checks by limit: the counter each limit counts and what this request
# adds to it. The loop below walks these objects of strings and numbers,
# which regorus does several times faster than the list of objects, and
# looks a check up only for a limit that is reached. Written out
# (limits_test.rego holds them equal to usage_checks).
limit_counters := {
	"requests_per_minute": "requests_last_minute",
	"tokens_per_minute": "tokens_last_minute",
	"tokens_per_day": "tokens_today",
	"tokens_per_month": "tokens_this_month",
	"in_flight": "in_flight",
}

limit_costs := {
	"requests_per_minute": 1,
	"tokens_per_minute": granted_max_tokens,
	"tokens_per_day": granted_max_tokens,
	"tokens_per_month": granted_max_tokens,
	"in_flight": 1,
}

# The tables are bound to local names before the loops: regorus looks a rule
# up by its path on every reference, a local variable by name.
limits_denials contains {"code": check.code, "message": msg, "retry_after_s": retry_after_s(check.window, scope)} if {
	counters = limit_counters
	costs = limit_costs
	usage_by_scope = counted_usage
	some scope, limits in scope_limits
	usage = object.get(usage_by_scope, scope, {})
	some name, limit in limits
	limit != null
	used = object.get(usage, counters[name], 0)
	used + costs[name] > limit
	some check in usage_checks
	check.limit == name
	msg = sprintf("%s has reached its %s limit of %s (%s %s; this request needs %s)", [
		scope_label(scope), check.limit, format_int(limit, 10),
		format_int(used, 10), counter_phrases[check.counter], cost_phrase(check.cost),
	])
}

# ---------------------------------------------------------------- retry after

# Seconds until a minute window frees capacity, as the gateway measured it
# (from 1 to 60); a whole minute when the input does not say.
retry_after_s("minute", scope) := max([1, ceil(min([frees_in, 60]))]) if {
	frees_in = input.usage[scope].minute_window_frees_in_s
	is_number(frees_in)
} else := 60

# Seconds until the next UTC midnight; a whole day when the time is unknown.
retry_after_s("day", _) := calendar.seconds_until_midnight(now_s) if {
	now_s
} else := calendar.seconds_per_day

# Seconds until the first of next month, UTC; 31 days when the time is unknown.
retry_after_s("month", _) := calendar.seconds_until_next_month(now_s) if {
	now_s
} else := 31 * calendar.seconds_per_day

# A request in flight may end any moment.
retry_after_s("in_flight", _) := 1

# The time of the request in whole seconds since the epoch; undefined when
# input.time.now_ns is not a time from 1970 to 2255. format_int turns a
# float (1.7e+18) into the integer it holds: regorus refuses % on floats.
now_s := calendar.seconds_from_ns(to_number(format_int(ns, 10))) if {
	ns = input.time.now_ns
	is_number(ns)
	ns >= 0
	ns < 9000000000000000000
}
