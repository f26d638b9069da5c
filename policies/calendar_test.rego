# Unit tests for calendar.rego: UTC dates in integer arithmetic.
package govgate.calendar_test

import rego.v1

import data.govgate.calendar

test_civil_date_of_the_epoch if {
	calendar.civil_date(0) == [1970, 1, 1]
}

test_civil_date_of_known_days if {
	calendar.civil_date(19675) == [2023, 11, 14]
	calendar.civil_date(11016) == [2000, 2, 29]
	calendar.civil_date(19722) == [2023, 12, 31]
	calendar.civil_date(19723) == [2024, 1, 1]
}

test_leap_years if {
	calendar.leap_year(2024)
	calendar.leap_year(2000)
	not calendar.leap_year(2023)
	not calendar.leap_year(2100)
}

test_seconds_until_midnight if {
	calendar.seconds_until_midnight(1700000000) == 6400
	calendar.seconds_until_midnight(1704067199) == 1
	calendar.seconds_until_midnight(1704067200) == 86400
}

test_seconds_until_next_month if {
	calendar.seconds_until_next_month(1700000000) == 1388800
	calendar.seconds_until_next_month(1704067199) == 1
	calendar.seconds_until_next_month(1704067200) == 2678400
}

test_seconds_until_march_in_leap_and_common_years if {
	# 2000-02-28 (leap, century divisible by 400): two days
	calendar.seconds_until_next_month(951696000) == 172800

	# 2100-02-28 (not leap): one day
	calendar.seconds_until_next_month(4107456000) == 86400

	# 2024-02-29 12:00: twelve hours
	calendar.seconds_until_next_month(1709208000) == 43200
}

test_seconds_from_nanoseconds_round_down if {
	calendar.seconds_from_ns(1700000000999999999) == 1700000000
}
