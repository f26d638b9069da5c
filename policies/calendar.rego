# METADATA
# title: UTC calendar arithmetic
# description: |
#   Whole-second UTC date arithmetic in integers only, so that every engine
#   gives the same answer (no time.* builtins, whose time zone handling and
#   number types differ between engines). Valid for times since 1970.
package govgate.calendar

import rego.v1

seconds_per_day := 86400

# Integer division of a >= 0 by b > 0, rounding down.
floor_div(a, b) := (a - (a % b)) / b

# Whole seconds since the epoch from nanoseconds since the epoch.
seconds_from_ns(ns) := floor_div(ns, 1000000000)

# Seconds from `now_s` to the next UTC midnight (a full day at midnight).
seconds_until_midnight(now_s) := seconds_per_day - (now_s % seconds_per_day)

# Seconds from `now_s` to 00:00 UTC on the first day of the next month.
seconds_until_next_month(now_s) := seconds if {
	[year, month, day] := civil_date(floor_div(now_s, seconds_per_day))
	days_left = days_in_month(year, month) - day
	seconds = (days_left * seconds_per_day) + seconds_until_midnight(now_s)
}

# [year, month, day] of the day `days` days after 1970-01-01.
# (Howard Hinnant's civil_from_days, for days >= 0.)
civil_date(days) := [year, month, day] if {
	z = days + 719468
	era = floor_div(z, 146097)
	doe = z - (era * 146097)
	yoe = floor_div(((doe - floor_div(doe, 1460)) + floor_div(doe, 36524)) - floor_div(doe, 146096), 365)
	doy = doe - (((365 * yoe) + floor_div(yoe, 4)) - floor_div(yoe, 100))
	mp = floor_div((5 * doy) + 2, 153)
	day = (doy - floor_div((153 * mp) + 2, 5)) + 1
	month = month_from_march_index(mp)
	year = (yoe + (era * 400)) + january_or_february(month)
}

# Months counted from March (0) to February (11) as 1..12.
month_from_march_index(mp) := mp + 3 if mp < 10

month_from_march_index(mp) := mp - 9 if mp >= 10

# A March-based year ends in February: January and February belong to the next civil year.
january_or_february(month) := 1 if month <= 2

january_or_february(month) := 0 if month > 2

days_in_month(_, month) := 31 if month in {1, 3, 5, 7, 8, 10, 12}

days_in_month(_, month) := 30 if month in {4, 6, 9, 11}

days_in_month(year, 2) := 29 if leap_year(year)

days_in_month(year, 2) := 28 if not leap_year(year)

leap_year(year) if {
	year % 4 == 0
	year % 100 != 0
}

leap_year(year) if year % 400 == 0
