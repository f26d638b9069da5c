# Usage hours and weekdays.
#
# A model may be open only at some hours (govgate_config.models.<name>.hours_utc,
# [start, end) in whole UTC hours, wrapping past midnight when start > end)
# and only on some days (govgate_config.models.<name>.weekdays, English day
# names, the UTC weekday). The time comes from input.time.
package govgate

import rego.v1

weekday_names := ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# ---------------------------------------------------------------- hours

# The model's [start, end) window, when the data gives one (the load-time
# check in checks.rego refuses an unusable one).
hours_window := window if {
	window = model_settings.hours_utc
	window != null
}

valid_hours_window(window) if {
	is_array(window)
	count(window) == 2
	every bound in window {
		whole_number(bound)
		bound <= 24
	}
}

# The current UTC hour; undefined when the input lacks a usable one.
current_hour := hour if {
	hour = input.time.hour_utc
	is_number(hour)
	hour >= 0
	hour < 24
	hour == round(hour)
}

# Whether `hour` is in the window [start, end). start == end is empty.
open_at(hour, [start, end]) if {
	start < end
	start <= hour
	hour < end
}

# A window that wraps past midnight, e.g. [22, 6]: 22:00 to 05:59.
open_at(hour, [start, end]) if {
	start > end
	hour >= start
}

open_at(hour, [start, end]) if {
	start > end
	hour < end
}

schedule_denials contains {"code": "outside_hours", "message": msg} if {
	hours_window # asked before it is bound: regorus's RVM binds an undefined rule's value
	window = hours_window
	current_hour
	not open_at(current_hour, window)
	msg = sprintf(
		"model '%s' may be used only from %s:00 to %s:00 UTC; it is now %s:00 UTC",
		[model_label, format_int(window[0], 10), format_int(window[1], 10), format_int(current_hour, 10)],
	)
}

schedule_denials contains {"code": "outside_hours", "message": msg} if {
	hours_window
	not current_hour
	msg = sprintf("model '%s' has usage hours but input.time.hour_utc is not a UTC hour", [model_label])
}

# ---------------------------------------------------------------- weekdays

# The model's days, when the data gives them (checked at load).
open_weekdays := days if {
	days = model_settings.weekdays
	days != null
}

valid_weekdays(days) if {
	is_array(days)
	every day in days {
		day in weekday_names
	}
}

# The current UTC weekday; undefined when the input lacks one.
current_weekday := input.time.weekday if input.time.weekday in weekday_names

# The model's days in week order, for messages.
open_weekdays_listing := concat(", ", [day | some day in weekday_names; day in open_weekdays])

schedule_denials contains {"code": "outside_hours", "message": msg} if {
	open_weekdays # (as above)
	days = open_weekdays
	current_weekday
	not current_weekday in days
	msg = sprintf(
		"model '%s' may be used only on %s (UTC); today is %s",
		[model_label, open_weekdays_listing, current_weekday],
	)
}

schedule_denials contains {"code": "outside_hours", "message": msg} if {
	open_weekdays
	not current_weekday
	msg = sprintf("model '%s' has usage weekdays but input.time.weekday is not a day name", [model_label])
}
