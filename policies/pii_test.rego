# Unit tests for pii.rego: what each detector finds, and what it must not.
package govgate.pii_test

import rego.v1

import data.govgate.pii

# ---------------------------------------------------------------- Luhn

test_luhn_accepts_valid_numbers if {
	pii.luhn_valid("4111111111111111")
	pii.luhn_valid("378282246310005")
	pii.luhn_valid("5555555555554444")
	pii.luhn_valid("79927398713")
}

test_luhn_rejects_a_wrong_check_digit if {
	not pii.luhn_valid("4111111111111112")
	not pii.luhn_valid("79927398710")
}

# ---------------------------------------------------------------- payment cards

test_card_found_compact_and_with_separators if {
	pii.payment_cards("pay 4111111111111111, 4111 1111 1111 1111 or 4111-1111-1111-1111 now") == {
		"4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111",
	}
}

test_card_of_fifteen_digits_found if {
	pii.payment_cards("amex 3782 822463 10005") == {"3782 822463 10005"}
}

test_card_with_wrong_check_digit_not_found if {
	pii.payment_cards("4111 1111 1111 1112") == set()
}

test_card_glued_to_letters_found if {
	pii.payment_cards("ref X4111111111111111, card4111111111111111now, 5555555555554444x") == {
		"4111111111111111", "5555555555554444",
	}
}

test_identifier_glued_to_letters_not_a_card if {
	# Luhn-valid digits whose prefix or length is no major card network's
	pii.payment_cards("ref X170000000000004, id70000000000070z, ORD5056516017118297, x41111111111111") == set()
	pii.payment_cards("ref 170000000000004") == {"170000000000004"}
}

test_card_networks_by_prefix_and_length if {
	every card in ["4222222222222", "4111111111111111", "5555555555554444", "2223000048400011", "378282246310005", "30569309025904", "3530111333300000", "6011111111111117", "6200000000000005"] {
		regex.match(pii.card_network_pattern, card)
	}
	every other in ["170000000000004", "5056516017118297", "41111111111111", "37828224631000", "7000000000000"] {
		not regex.match(pii.card_network_pattern, other)
	}
}

test_card_inside_a_longer_number_not_found if {
	pii.payment_cards("94111111111111111 and 4111111111111111123456") == set()
}

test_card_split_by_dots_found if {
	pii.payment_cards("pay 4111.1111.1111.1111 or 3782.822463.10005.") == {"4111.1111.1111.1111", "3782.822463.10005"}
}

test_card_spread_by_slashes_underscores_dashes_or_lines_found if {
	pii.payment_cards("pay 4111/1111/1111/1111 or 5555_5555_5555_4444.") == {"4111/1111/1111/1111", "5555_5555_5555_4444"}
	pii.payment_cards("card 4111 - 1111 - 1111 - 1111, 4111--1111--1111--1111") == {"4111 - 1111 - 1111 - 1111", "4111--1111--1111--1111"}
	pii.payment_cards("card\n4111\n1111\n1111\n1111\nthanks") == {"4111\n1111\n1111\n1111"}
	pii.payment_cards("card 4111 1111\n1111 1111") == {"4111 1111\n1111 1111"}
}

test_card_spread_by_middle_dots_bullets_commas_colons_bars_plus_or_tildes_found if {
	pii.payment_cards("pay 4111·1111·1111·1111 or 5555•5555•5555•4444") == {"4111·1111·1111·1111", "5555•5555•5555•4444"}
	pii.payment_cards("a 4111,1111,1111,1111 b 4111:1111:1111:1111 c 4111|1111|1111|1111") == {"4111,1111,1111,1111", "4111:1111:1111:1111", "4111|1111|1111|1111"}
	pii.payment_cards("d 4111+1111+1111+1111 e 4111~1111~1111~1111 f 4111・1111・1111・1111") == {"4111+1111+1111+1111", "4111~1111~1111~1111", "4111・1111・1111・1111"}
	pii.payment_cards("cards 4111·1111·1111·1111, 5555 5555 5555 4444") == {"4111·1111·1111·1111", "5555 5555 5555 4444"}
}

test_lists_of_numbers_of_no_card_network_not_cards if {
	pii.payment_cards("ids 1000,0000,0000,0008 and 2019:2020:2021:2022 and 1234|5678|9012|3456") == set()
}

test_card_followed_by_its_code_or_another_card_found if {
	pii.payment_cards("card 4111 1111 1111 1111 123 exp 12 26") == {"4111 1111 1111 1111"}
	pii.payment_cards("cards 4111 1111 1111 1111 5555 5555 5555 4444") == {"4111 1111 1111 1111", "5555 5555 5555 4444"}
	pii.payment_cards("card 4111-1111-1111-1111-77 and 7 4111/1111/1111/1111") == {"4111-1111-1111-1111", "4111/1111/1111/1111"}
}

test_runs_of_numbers_without_a_network_card_not_cards if {
	pii.payment_cards("totals 1000 0000 0000 0008 1000 0000 0000 0008 2024") == set()
}

test_a_table_of_numbers_is_no_run_of_cards if {
	# nine groups: a table, even though 4111 1111 1111 1111 is a card
	pii.payment_cards("n 1234 4111 1111 1111 1111 5678 9012 3456 7890") == set()
}

test_spread_numbers_of_no_card_network_not_cards if {
	# Luhn-valid, 16 digits, but beginning as no network's cards do
	pii.payment_cards("1000/0000/0000/0008 and\n1000\n0000\n0000\n0008") == set()
	pii.payment_cards("years\n2019\n2020\n2021\n2022\n2023") == set()
}

test_dotted_numbers_that_are_not_cards if {
	pii.payment_cards("pi 3.14159265358979, host 192.168.100.200, v2024.1.15.3, 1.5 2.5 3.5 4.5 5.5 6.5 7.5") == set()
}

test_too_short_or_too_long_number_not_a_card if {
	pii.payment_cards("411111111111") == set()

	# 20 digits, Luhn-valid: longer than any card
	pii.payment_cards("41111111111111111113") == set()
}

# ---------------------------------------------------------------- IBAN

test_iban_check_accepts_valid_ibans if {
	pii.iban_valid("GB82WEST12345698765432")
	pii.iban_valid("DE89370400440532013000")
	pii.iban_valid("FR1420041010050500013M02606")
}

test_iban_check_rejects_wrong_check_digits if {
	not pii.iban_valid("GB83WEST12345698765432")
	not pii.iban_valid("DE88370400440532013000")
}

test_iban_check_rejects_wrong_lengths if {
	not pii.iban_valid("GB82WEST1234")
	not pii.iban_valid("GB82WEST12345698765432123456789012345")
}

test_iban_found_compact_and_grouped if {
	pii.ibans("to DE89370400440532013000 and GB82 WEST 1234 5698 7654 32.") == {
		"DE89370400440532013000", "GB82 WEST 1234 5698 7654 32",
	}
}

test_iban_followed_by_a_capitalised_word_found if {
	pii.ibans("GB82 WEST 1234 5698 7654 32 THEN") == {"GB82 WEST 1234 5698 7654 32"}
}

test_iban_split_over_lines_or_messages_found_as_written if {
	pii.ibans("IBAN GB82 WEST 1234\n5698 7654 32 ok") == {"GB82 WEST 1234\n5698 7654 32"}
	pii.ibans("DE89 3704 0044\n0532 0130 00\nTHEN") == {"DE89 3704 0044\n0532 0130 00"}
}

test_iban_with_wrong_check_digits_not_found if {
	pii.ibans("GB83 WEST 1234 5698 7654 32") == set()
}

test_lowercase_iban_not_found if {
	pii.ibans("gb82west12345698765432") == set()
}

test_mod97_powers_of_ten if {
	[pii.pow10_mod97(k) | some k in numbers.range(0, 9)] == [1, 10, 3, 30, 9, 90, 27, 76, 81, 34]
	pii.pow10_mod97(71) == 41
	every k in numbers.range(0, 70) {
		pii.pow10_mod97(k + 1) == (pii.pow10_mod97(k) * 10) % 97
	}
}

test_mod97_table_is_the_computed_powers if {
	pii.pow10_mod97_table == [pii.pow10_mod97_computed(k) | some k in numbers.range(0, 71)]
}

test_iban_char_digits_are_digits_and_letters_from_10 if {
	every c in split("0123456789", "") {
		pii.iban_char_digits[c] == c
	}
	every i, c in split("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "") {
		pii.iban_char_digits[c] == format_int(i + 10, 10)
	}
	count(pii.iban_char_digits) == 36
}

# mod97 reads six-digit chunks: zeros at a chunk's start, short last chunks
# and the empty number come out as the whole number's remainder.
test_mod97_chunks_with_zeros_and_short_tails if {
	pii.mod97("000000000000123") == 123 % 97
	pii.mod97("1000000") == 1000000 % 97
	pii.mod97("100000000001") == 100000000001 % 97
	pii.mod97("123456789012") == 123456789012 % 97
	pii.mod97("0") == 0
	pii.mod97("") == 0
}

test_mod97_of_a_long_number if {
	# 3214282912345698765432161182 is GB82WEST12345698765432 rearranged
	pii.mod97("3214282912345698765432161182") == 1
	pii.mod97("123456789") == 123456789 % 97
}

# ---------------------------------------------------------------- e-mail

test_email_found if {
	pii.emails("write to ann.lee+news@mail.example.co.uk or BOB@EXAMPLE.COM") == {
		"ann.lee+news@mail.example.co.uk", "BOB@EXAMPLE.COM",
	}
}

test_email_with_an_ideographic_or_fullwidth_dot_found if {
	pii.emails("mail ann@example。com or bob@mail．example｡org") == {"ann@example。com", "bob@mail．example｡org"}
}

test_not_an_email if {
	pii.emails("user@localhost, @handle, a@b.c, me at example dot com") == set()
}

# ---------------------------------------------------------------- phone

test_international_phone_found if {
	pii.phones("call +44 20 7946 0958 or +1-415-555-2671 or +14155552671") == {
		"+44 20 7946 0958", "+1-415-555-2671", "+14155552671",
	}
}

test_national_phone_found if {
	pii.phones("call (555) 123-4567, 555-123-4567, 555.123.4567 or 06 12 34 56 78") == {
		"(555) 123-4567", "555-123-4567", "555.123.4567", "06 12 34 56 78",
	}
}

test_dates_times_and_versions_not_phones if {
	pii.phones("on 2024-01-15 10:30, 15.01.2024, v1.2.3") == set()
}

test_ip_address_not_a_phone if {
	pii.phones("host 192.168.100.200") == set()
}

test_plain_numbers_not_phones if {
	pii.phones("order 1234567890, pi 3.14159265, total 12 345") == set()
}

test_phone_with_too_many_digits_not_found if {
	pii.phones("+44 20 7946 0958 1234 5678") == set()
}

test_phone_glued_to_letters_not_found if {
	pii.phones("id AB555-123-4567") == set()
}

# ---------------------------------------------------------------- patterns

test_pattern_matches_bounded_occurrences if {
	pii.pattern_matches("[0-9]{3}-[0-9]{2}-[0-9]{4}", "ssn 123-45-6789, not 1123-45-6789 or 123-45-67890") == {"123-45-6789"}
}

test_shipped_ssn_pattern_finds_dashed_and_spaced_forms if {
	ssn := data.govgate_config.content.national_ids[0].pattern
	pii.pattern_matches(ssn, "123-45-6789, 234 56 7890, not 1234 56 7890 or 555 123 4567") == {"123-45-6789", "234 56 7890"}
}

test_pattern_matching_empty_text_finds_nothing if {
	pii.pattern_matches("x*", "abc") == set()
}

test_bounded_checks_every_occurrence if {
	# the first 555-123-4567 is glued to "x", the second stands alone
	pii.bounded("555-123-4567", "x555-123-4567 and 555-123-4567")
	not pii.bounded("555-123-4567", "x555-123-4567 and 555-123-45678")
}

test_bounded_ignores_non_ascii_neighbours_alike if {
	# é is not an ASCII letter: the number is not glued to it
	pii.bounded("555-123-4567", "é555-123-4567é")
	pii.phones("tél:555-123-4567") == {"555-123-4567"}
}

test_bounded_match_edges_that_are_not_alphanumeric if {
	# a match that starts with "+" or "(" may follow a letter
	pii.bounded("+44 20 7946 0958", "tel+44 20 7946 0958")
}

test_phone_pattern_is_the_one_built_from_its_parts if {
	pii.phone_pattern == pii.phone_pattern_built
}

# A number a text repeats (a model in a loop) is found once, and an
# occurrence glued to a letter does not hide a free one later in the text.
test_repeated_numbers_found_once if {
	text := concat("", [sprintf("call 555 123 %d now. ", [4567]) | some _ in numbers.range(1, 200)])
	pii.phones(text) == {"555 123 4567"}
	pii.payment_cards(concat(" ", ["x4111 1111 1111 1111" | some _ in numbers.range(1, 50)])) == {"4111 1111 1111 1111"}
	pii.pattern_matches(`[0-9]{3}-[0-9]{2}-[0-9]{4}`, "a123-45-6789 and 123-45-6789") == {"123-45-6789"}
}
