# Unit tests for schedule.rego: usage hours and weekdays.
package govgate.schedule_test

import rego.v1

import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.config
import data.govgate_test.fixtures.config_problems_with
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.model_request

at(model, hour, weekday) := decide(object.union(model_request(model, []), {
	"principal": {"roles": ["admin"]},
	"time": {"hour_utc": hour, "weekday": weekday},
}))

with_hours(window, hour) := d if {
	d := data.govgate.decision with input as data.govgate_test.fixtures.input_with({
		"principal": {"roles": ["admin"]},
		"time": {"hour_utc": hour},
	})
		with data.govgate_config as object.union(config, {"models": {"govgate-tiny": {"hours_utc": window}}})
}

test_model_without_hours_open_at_any_hour if {
	every hour in numbers.range(0, 23) {
		at("big", hour, "Sunday").allow
	}
}

test_open_inside_window if {
	at("office", 8, "Monday").allow
	at("office", 17, "Friday").allow
}

test_closed_before_window if {
	d := at("office", 7, "Monday")
	codes(d) == {"outside_hours"}
	d.reasons[0].message == "model 'office' may be used only from 8:00 to 18:00 UTC; it is now 7:00 UTC"
}

test_window_end_is_exclusive if {
	codes(at("office", 18, "Monday")) == {"outside_hours"}
}

test_wrapping_window_open_late_evening if {
	at("night", 22, "Monday").allow
	at("night", 23, "Monday").allow
}

test_wrapping_window_open_after_midnight if {
	at("night", 0, "Tuesday").allow
	at("night", 5, "Tuesday").allow
}

test_wrapping_window_closed_in_the_day if {
	codes(at("night", 6, "Tuesday")) == {"outside_hours"}
	codes(at("night", 12, "Tuesday")) == {"outside_hours"}
	codes(at("night", 21, "Tuesday")) == {"outside_hours"}
}

test_whole_day_window_always_open if {
	every hour in numbers.range(0, 23) {
		with_hours([0, 24], hour).allow
	}
}

test_empty_window_never_open if {
	codes(with_hours([9, 9], 9)) == {"outside_hours"}
}

test_invalid_window_is_a_config_problem if {
	every window in [[9], [9, 25], "9-17", [9.5, 17]] {
		config_problems_with({"models": {"govgate-tiny": {"hours_utc": window}}}) == {"govgate_config.models.govgate-tiny.hours_utc must be [start, end] in whole hours from 0 to 24"}
	}
}

test_unknown_hour_denied_for_model_with_hours if {
	d := at("office", null, "Monday")
	codes(d) == {"outside_hours"}
	contains(d.reasons[0].message, "input.time.hour_utc")
}

test_unknown_hour_ignored_for_model_without_hours if {
	at("big", "noon", "Monday").allow
}

test_closed_on_weekend if {
	d := at("office", 10, "Saturday")
	codes(d) == {"outside_hours"}
	d.reasons[0].message == "model 'office' may be used only on Monday, Tuesday, Wednesday, Thursday, Friday (UTC); today is Saturday"
}

test_weekday_and_hour_both_reported if {
	d := at("office", 20, "Sunday")
	count(d.reasons) == 2
	codes(d) == {"outside_hours"}
}

test_unknown_weekday_denied_for_model_with_weekdays if {
	codes(at("office", 10, 2)) == {"outside_hours"}
	codes(at("office", 10, "monday")) == {"outside_hours"}
}

test_misspelled_weekday_in_data_is_a_config_problem if {
	config_problems_with({"models": {"govgate-tiny": {"weekdays": ["Munday"]}}}) == {"govgate_config.models.govgate-tiny.weekdays must be a list of day names (Monday ... Sunday)"}
}
