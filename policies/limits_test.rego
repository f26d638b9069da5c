# Unit tests for limits.rego: max_tokens caps and modes, usage limits per
# principal and team, and when to retry.
package govgate.limits_test

import rego.v1

import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.decide_as
import data.govgate_test.fixtures.reasons_with_code

# ---------------------------------------------------------------- max_tokens

test_max_tokens_below_cap_kept if {
	decide_as(["analyst"], "govgate-tiny", 100).obligations.max_tokens == 100
}

test_max_tokens_above_cap_clamped if {
	d := decide_as(["analyst"], "govgate-tiny", 1000)
	d.allow
	d.obligations.max_tokens == 256
}

test_role_without_cap_gets_default_cap if {
	decide_as(["intern"], "govgate-tiny", 1000).obligations.max_tokens == 128
}

test_most_generous_cap_among_granting_roles_applies if {
	decide_as(["analyst", "counsel"], "govgate-tiny", 1000).obligations.max_tokens == 512
}

test_cap_of_role_not_granting_model_ignored if {
	# translator has the larger cap but may not use govgate-tiny
	decide_as(["translator", "analyst"], "govgate-tiny", 1000).obligations.max_tokens == 256
}

test_denied_request_gets_zero_max_tokens if {
	decide_as(["viewer"], "govgate-tiny", 1000).obligations.max_tokens == 0
}

test_deny_mode_allows_request_at_cap if {
	d := decide_as(["batch"], "govgate-tiny", 1000)
	d.allow
	d.obligations.max_tokens == 1000
}

test_deny_mode_denies_request_above_cap if {
	d := decide_as(["batch"], "govgate-tiny", 1001)
	codes(d) == {"max_tokens_exceeded"}
	d.reasons[0].message == "max_tokens 1001 is above the cap of 1000 for model 'govgate-tiny' of principal 'u-1'"
}

test_clamp_wins_over_deny_among_granting_roles if {
	# batch (deny, cap 1000) and analyst (clamp, cap 256): clamp to 1000
	d := decide_as(["batch", "analyst"], "govgate-tiny", 5000)
	d.allow
	d.obligations.max_tokens == 1000
}

test_mode_of_role_not_granting_model_ignored if {
	# analyst clamps but does not grant big; batch alone decides
	d := decide_as(["batch", "analyst"], "big", 5000)
	codes(d) == {"max_tokens_exceeded"}
}

test_default_mode_from_data if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.input_with({"request": {"max_tokens": 300}})
		with data.govgate_config as object.union(config, {"defaults": {"max_tokens_mode": "deny"}})
	codes(d) == {"max_tokens_exceeded"}
}

# ---------------------------------------------------------------- usage limits

# The decision for `overrides` with the given usage counters.
with_usage(overrides, principal_usage, team_usage) := decide(object.union(overrides, {"usage": {
	"principal": principal_usage,
	"team": team_usage,
}}))

test_no_usage_counters_count_as_zero if {
	decide({}).allow
}

test_requests_per_minute_below_limit_allowed if {
	with_usage({}, {"requests_last_minute": 59}, null).allow
}

test_requests_per_minute_at_limit_rate_limited if {
	d := with_usage({}, {"requests_last_minute": 60, "minute_window_frees_in_s": 12.2}, null)
	d.reasons == [{
		"code": "rate_limited",
		"message": "principal 'u-1' has reached its requests_per_minute limit of 60 (60 requests in the last minute; this request needs 1 request)",
		"retry_after_s": 13,
	}]
}

test_minute_retry_is_at_least_one_second if {
	d := with_usage({}, {"requests_last_minute": 60, "minute_window_frees_in_s": 0.2}, null)
	d.reasons[0].retry_after_s == 1
}

test_minute_retry_without_measurement_is_a_minute if {
	d := with_usage({}, {"requests_last_minute": 60}, null)
	d.reasons[0].retry_after_s == 60
}

test_tokens_per_minute_counts_this_request if {
	with_usage({}, {"tokens_last_minute": 9900}, null).allow
	codes(with_usage({}, {"tokens_last_minute": 9901}, null)) == {"rate_limited"}
}

test_tokens_per_minute_counts_clamped_max_tokens if {
	# asks 1000, clamped to 256: 9744 + 256 fits, 9745 + 256 does not
	with_usage({"request": {"max_tokens": 1000}}, {"tokens_last_minute": 9744}, null).allow
	codes(with_usage({"request": {"max_tokens": 1000}}, {"tokens_last_minute": 9745}, null)) == {"rate_limited"}
}

test_daily_budget_exceeded_retries_at_utc_midnight if {
	# 2023-11-14 22:13:20 UTC: 6400 s to midnight
	d := with_usage({}, {"tokens_today": 99901}, null)
	d.reasons == [{
		"code": "budget_exceeded",
		"message": "principal 'u-1' has reached its tokens_per_day limit of 100000 (99901 tokens today; this request needs 100 tokens for max_tokens, plus its prompt's)",
		"retry_after_s": 6400,
	}]
}

test_daily_budget_with_room_allowed if {
	with_usage({}, {"tokens_today": 99900}, null).allow
}

test_monthly_budget_exceeded_retries_on_the_first if {
	# 2023-11-14 22:13:20 UTC: 16 days and 6400 s to 2023-12-01
	d := with_usage({}, {"tokens_this_month": 999950}, null)
	codes(d) == {"budget_exceeded"}
	d.reasons[0].retry_after_s == 1388800
}

test_monthly_budget_retry_in_a_leap_february if {
	# 2024-02-29 12:00:00 UTC: 12 hours to March
	d := with_usage({"time": {"now_ns": 1709208000000000000}}, {"tokens_this_month": 999950}, null)
	d.reasons[0].retry_after_s == 43200
}

test_budget_retry_without_a_time_is_an_upper_bound if {
	d := with_usage({"time": {"now_ns": "now"}}, {"tokens_today": 99950, "tokens_this_month": 999950}, null)
	{[r.message, r.retry_after_s] | some r in d.reasons; r.code == "budget_exceeded"} == {
		["principal 'u-1' has reached its tokens_per_day limit of 100000 (99950 tokens today; this request needs 100 tokens for max_tokens, plus its prompt's)", 86400],
		["principal 'u-1' has reached its tokens_per_month limit of 1000000 (999950 tokens this month; this request needs 100 tokens for max_tokens, plus its prompt's)", 2678400],
	}
}

test_in_flight_at_limit_denied_retry_in_a_second if {
	d := with_usage({}, {"in_flight": 4}, null)
	codes(d) == {"too_many_in_flight"}
	d.reasons[0].retry_after_s == 1
	with_usage({}, {"in_flight": 3}, null).allow
}

test_every_exceeded_limit_is_reported if {
	d := with_usage({}, {"requests_last_minute": 60, "tokens_today": 100000, "in_flight": 4}, null)
	codes(d) == {"rate_limited", "budget_exceeded", "too_many_in_flight"}
	count(d.reasons) == 3
}

# u-vip's own entry: requests_per_minute 1000, tokens_per_day 10000000, no other key.
vip_in(team) := {"principal": {"id": "u-vip", "team": team}}

test_own_entry_replaces_default_entry if {
	# the default's tokens_per_minute (10000) does not apply to u-vip
	d := with_usage(vip_in("t-1"), {"requests_last_minute": 500, "tokens_last_minute": 50000}, null)
	d.allow
	d.obligations.limits.principal == {
		"requests_per_minute": 1000,
		"tokens_per_minute": null,
		"tokens_per_day": 10000000,
		"tokens_per_month": null,
		"in_flight": null,
	}
}

test_team_limit_binds_member_with_higher_personal_limit if {
	d := with_usage(vip_in("small"), {"requests_last_minute": 150}, {"requests_last_minute": 100, "minute_window_frees_in_s": 3})
	d.reasons == [{
		"code": "rate_limited",
		"message": "team 'small' has reached its requests_per_minute limit of 100 (100 requests in the last minute; this request needs 1 request)",
		"retry_after_s": 3,
	}]
}

test_team_budget_binds_member if {
	d := with_usage(vip_in("small"), {"tokens_today": 10}, {"tokens_today": 4950})
	codes(d) == {"budget_exceeded"}
	contains(d.reasons[0].message, "team 'small'")
}

test_team_in_flight_binds_member if {
	d := with_usage(vip_in("small"), {"in_flight": 0}, {"in_flight": 2})
	codes(d) == {"too_many_in_flight"}
}

test_principal_and_team_limits_both_reported if {
	d := with_usage({"principal": {"team": "small"}}, {"requests_last_minute": 60}, {"requests_last_minute": 100})
	count(reasons_with_code(d, "rate_limited")) == 2
}

test_team_without_own_entry_gets_default_team_limits if {
	d := with_usage({}, {}, {"requests_last_minute": 600})
	codes(d) == {"rate_limited"}
	contains(d.reasons[0].message, "team 't-1'")
}

test_team_usage_null_counts_as_zero if {
	with_usage(vip_in("small"), {}, null).allow
}

test_team_usage_ignored_for_principal_without_team if {
	d := with_usage({"principal": {"team": null}}, {}, {"requests_last_minute": 100000})
	d.allow
	d.obligations.limits.team == null
}

test_zero_limit_always_denies if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.base_input
		with data.govgate_config as object.union(config, {"limits": {"principals": {"u-1": {"in_flight": 0}}}})
	codes(d) == {"too_many_in_flight"}
}

test_no_limits_in_data_means_unlimited if {
	d := data.govgate.decision with input as object.union(data.govgate_test.fixtures.base_input, {"usage": {"principal": {"requests_last_minute": 1000000}}})
		with data.govgate_config as object.remove(config, ["limits"])
	d.allow
	d.obligations.limits == {
		"principal": {"requests_per_minute": null, "tokens_per_minute": null, "tokens_per_day": null, "tokens_per_month": null, "in_flight": null},
		"team": {"requests_per_minute": null, "tokens_per_minute": null, "tokens_per_day": null, "tokens_per_month": null, "in_flight": null},
	}
}

test_limits_obligation_carries_both_scopes if {
	decide({}).obligations.limits == {
		"principal": {"requests_per_minute": 60, "tokens_per_minute": 10000, "tokens_per_day": 100000, "tokens_per_month": 1000000, "in_flight": 4},
		"team": {"requests_per_minute": 600, "tokens_per_minute": null, "tokens_per_day": null, "tokens_per_month": null, "in_flight": null},
	}
}

test_minute_retry_is_at_most_a_minute if {
	# such values are also reported as invalid_input
	d := with_usage({}, {"requests_last_minute": 60, "minute_window_frees_in_s": 1e300}, null)
	reasons_with_code(d, "rate_limited")[0].retry_after_s == 60
	e := with_usage({}, {"requests_last_minute": 60, "minute_window_frees_in_s": -3}, null)
	reasons_with_code(e, "rate_limited")[0].retry_after_s == 1
}

test_time_given_as_a_float_gives_the_same_retry if {
	# 1.7e+18 is what a JSON writer may make of 1700000000000000000
	d := with_usage({"time": {"now_ns": 1.7e18}}, {"tokens_today": 99950}, null)
	d.reasons[0].retry_after_s == 6400
}

test_unlimited_names_every_limit if {
	object.keys(data.govgate.unlimited) == {name | some name in data.govgate.limit_names}
	every value in data.govgate.unlimited {
		value == null
	}
}

test_limit_counters_follow_usage_checks if {
	data.govgate.limit_counters == {check.limit: check.counter | some check in data.govgate.usage_checks}
}

test_limit_costs_follow_usage_checks if {
	every max_tokens in [1, 100, 4096] {
		costs := data.govgate.limit_costs with input as {"request": {"max_tokens": max_tokens}, "principal": {"roles": ["admin"]}}
			with data.govgate_config as config
		wanted := data.govgate.request_costs with input as {"request": {"max_tokens": max_tokens}, "principal": {"roles": ["admin"]}}
			with data.govgate_config as config
		costs == {check.limit: wanted[check.cost] | some check in data.govgate.usage_checks}
	}
}
