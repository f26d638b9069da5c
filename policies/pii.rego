# METADATA
# title: PII detectors
# description: |
#   Functions that find personal data in a text: e-mail addresses, phone
#   numbers, payment card numbers (Luhn-checked), IBANs (mod-97-checked) and
#   matches of a configured pattern. Each returns the set of matched texts.
#
#   Every pattern here uses ASCII classes ([0-9], [A-Za-z]) and no \d, \w, \s
#   or \b: those are Unicode-aware on regorus and ASCII-only on OPA, and the
#   two engines must find the same things. A match glued to a letter or digit
#   (a longer number, an identifier) is not reported, except a card number
#   glued to letters (see card_bounded).
#
#   content.rego runs them on the normalised view of the prompt
#   (input.request.normalized_text), where full-width and other digits are
#   ASCII, every dash is "-", invisible characters are gone and NBSP, tabs
#   and runs of spaces are one space.
package govgate.pii

import rego.v1

# ---------------------------------------------------------------- e-mail

email_pattern := `[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:[.\x{3002}\x{FF0E}\x{FF61}][A-Za-z0-9-]+)*[.\x{3002}\x{FF0E}\x{FF61}][A-Za-z]{2,}`

emails(text) := {m | some m in regex.find_n(email_pattern, text, -1)}

# ---------------------------------------------------------------- phone

# Digit groups joined by one kind of separator: "555 123 4567", "555-123-4567",
# "555.123.4567". `min_joins` is how many separated groups must follow the first.
phone_body(min_joins) := concat("|", [sprintf(`[0-9]{1,5}(?:%s[0-9]{1,8}){%d,5}`, [sep, min_joins]) | some sep in [" ", "-", `\.`]])

# International (+CC ...), with an area code in parentheses, national with at
# least three groups, or + and the digits with no separators at all. Written
# out (phone_pattern_built spells how, and pii_test.rego holds the two equal):
# building it takes longer than the search on every decision.
phone_pattern := `\+[0-9]{1,3}[ .-]?(?:\([0-9]{1,4}\)[ .-]?)?(?:[0-9]{1,5}(?: [0-9]{1,8}){1,5}|[0-9]{1,5}(?:-[0-9]{1,8}){1,5}|[0-9]{1,5}(?:\.[0-9]{1,8}){1,5})|\([0-9]{1,4}\)[ .-]?(?:[0-9]{1,5}(?: [0-9]{1,8}){1,5}|[0-9]{1,5}(?:-[0-9]{1,8}){1,5}|[0-9]{1,5}(?:\.[0-9]{1,8}){1,5})|(?:[0-9]{1,5}(?: [0-9]{1,8}){2,5}|[0-9]{1,5}(?:-[0-9]{1,8}){2,5}|[0-9]{1,5}(?:\.[0-9]{1,8}){2,5})|\+[0-9]{8,15}`

phone_pattern_built := concat("|", [
	sprintf(`\+[0-9]{1,3}[ .-]?(?:\([0-9]{1,4}\)[ .-]?)?(?:%s)`, [phone_body(1)]),
	sprintf(`\([0-9]{1,4}\)[ .-]?(?:%s)`, [phone_body(1)]),
	sprintf(`(?:%s)`, [phone_body(2)]),
	`\+[0-9]{8,15}`,
])

phones(text) := {m |
	some m in distinct_matches(phone_pattern, text)
	phone_number(m)
	bounded(m, text)
}

# 9 to 15 digits (E.164 allows 15), and not a dotted IPv4 address.
phone_number(candidate) if {
	n = count(digits_of(candidate))
	n >= 9
	n <= 15
	not regex.match(`^[0-9]{1,3}(?:\.[0-9]{1,3}){3}$`, candidate)
}

# ---------------------------------------------------------------- payment card

# 13 or more digits, optionally split by single spaces or dashes; or groups
# of digits split by dots ("4111.1111.1111.1111", "3782.822463.10005"), the
# first of four or more digits so that no IPv4 address or version is one.
card_candidate_patterns := [
	`[0-9](?:[ -]?[0-9]){12,}`,
	`[0-9]{4,6}(?:\.[0-9]{1,6}){2,4}`,
]

payment_cards(text) := ({m |
	some pattern in card_candidate_patterns
	some m in distinct_matches(pattern, text)
	card_number(m)
	card_bounded(m, text)
} | {m |
	some m in distinct_matches(card_spread_pattern, text)
	card_number(m)
	regex.match(card_network_pattern, digits_of(m))
	card_bounded(m, text)
}) | cards_within_runs(text)

# Cards inside a longer run of digit groups split by spaces or dashes: a
# card and its security code or expiry ("4111 1111 1111 1111 123"), a card
# and a phone number, or two cards in a row, make one run of more digits
# than a card has, which is no card. Each stretch of two to six whole groups
# of such a run with a network's prefix and length and a valid check digit
# is one. Only runs of at most eight groups: in a table of numbers one in a
# few dozen stretches passes both checks, so a longer run is taken for one.
cards_within_runs(text) := {card |
	some run in distinct_matches(card_candidate_patterns[0], text)
	not card_number(run)
	groups = regex.find_n(`[0-9]+[^0-9]*`, run, -1)
	count(groups) <= 8
	sizes = [count(digits_of(group)) | some group in groups]
	some i in numbers.range(0, count(groups) - 1)
	some k in numbers.range(2, 6)
	i + k <= count(groups)
	size = sum(array.slice(sizes, i, i + k))
	size >= 13
	size <= 19
	card = trim_right(concat("", array.slice(groups, i, i + k)), " -/_\n")
	card_number(card)
	regex.match(card_network_pattern, digits_of(card))
	card_bounded(card, text)
}

# Groups of digits split by slashes, underscores, spaced or doubled dashes,
# line breaks, or unspaced commas, colons, bars, plus signs, tildes, middle
# dots and bullets ("4111/1111/1111/1111", "4111 - 1111 - ...",
# "4111·1111·…"; "1111, 4111" is punctuation between two numbers), or a
# number split across lines or messages: a card when its digits are a major
# network's (as for one glued to letters), since lists of numbers one per
# line or path-like numbers pass the Luhn check one time in ten.
card_spread_pattern := `[0-9]{4,6}(?:(?: ?(?:[/_\n]|--?) ?| |[,:|+~\x{B7}\x{2022}\x{2027}\x{30FB}])[0-9]{1,6}){2,4}`

# Some occurrence of the number is not part of a longer number; glued to a
# letter ("card4111111111111111") it counts when its prefix and length are
# those of a major network's cards (card_network_pattern): an identifier's
# digits ("ORD1700000000123") seldom are, and pass the Luhn check too.
# (First occurrence first, as bounded does, below.)
card_bounded(match, text) if {
	card_free_at(match, text, indexof(text, match))
} else if {
	some start in indexof_n(text, match)
	card_free_at(match, text, start)
}

card_free_at(match, text, start) if {
	not digit_before(text, start)
	not digit_after(text, match, start)
	card_edges(text, match, start)
}

card_edges(text, match, start) if {
	not glued_before(text, match, start)
	not glued_after(text, match, start)
}

card_edges(_, match, _) if regex.match(card_network_pattern, digits_of(match))

# Visa (13, 16, 19 digits), Mastercard and Mir (51-55, 22-27; 16), American
# Express (34, 37; 15), Diners Club (300-305, 36, 38; 14-19), JCB (35;
# 16-19), Discover, UnionPay, Maestro and others beginning with 6 (16-19).
card_network_pattern := `^(?:4[0-9]{12}(?:[0-9]{3}){0,2}|(?:5[1-5]|2[2-7])[0-9]{14}|3[47][0-9]{13}|3(?:0[0-5]|[68])[0-9]{11,16}|35[0-9]{14,17}|6[0-9]{15,18})$`

digit_before(text, start) if {
	start > 0
	digit(substring(text, start - 1, 1))
}

digit_after(text, match, start) if digit(substring(text, start + count(match), 1))

# 13 to 19 digits with a valid Luhn check digit.
card_number(candidate) if {
	digits = digits_of(candidate)
	count(digits) >= 13
	count(digits) <= 19
	luhn_valid(digits)
}

# The Luhn check: from the right, every second digit is doubled (less 9
# when above 9); the sum of all is a multiple of 10.
luhn_valid(digits) if {
	chars = split(digits, "")
	n = count(chars)
	sum([luhn_term(to_number(c), (n - 1) - i) | some i, c in chars]) % 10 == 0
}

luhn_term(digit, position_from_right) := digit if {
	position_from_right % 2 == 0
} else := 2 * digit if {
	digit <= 4
} else := (2 * digit) - 9

# ---------------------------------------------------------------- IBAN

# Country code, check digits, and a BBAN written compact or in groups of four
# split by spaces or line breaks (an IBAN written over two lines, or split
# over two messages, which the detection text joins with a line break).
iban_candidate_pattern := `[A-Z]{2}[0-9]{2}(?:[ \n]?[A-Z0-9]{4}){2,7}(?:[ \n]?[A-Z0-9]{1,3})?`

ibans(text) := {iban |
	some candidate in distinct_matches(iban_candidate_pattern, text)
	iban = longest_iban(candidate)
	bounded(iban, text)
}

# The longest run of the candidate's separated groups, from its start, that
# is a valid IBAN: a written IBAN may be followed by a word in capitals. It is
# the candidate's own text (its separators as written), so that redaction
# finds it in the prompt.
longest_iban(candidate) := substring(candidate, 0, length) if {
	groups = regex.split(`[ \n]`, candidate)
	longest = max({k |
		some k in numbers.range(1, count(groups))
		iban_valid(concat("", array.slice(groups, 0, k)))
	})
	length = sum([count(group) | some group in array.slice(groups, 0, longest)]) + longest - 1
}

# ISO 13616: 15 to 34 characters whose ISO 7064 mod-97 remainder is 1.
iban_valid(compact) if {
	count(compact) >= 15
	count(compact) <= 34
	regex.match(`^[A-Z]{2}[0-9]{2}[A-Z0-9]+$`, compact)
	mod97(iban_digits(compact)) == 1
}

# The IBAN as the number mod-97 checks: the first four characters moved to
# the end, letters as two digits (A = 10 ... Z = 35). iban_valid has checked
# that every character is a digit or a capital letter.
iban_digits(compact) := concat("", [letters_as_digits(substring(compact, 4, -1)), letters_as_digits(substring(compact, 0, 4))])

# A run of digits and capitals with each letter as its two digits; most
# BBANs are digits only and are taken as they are, without a lookup per
# character.
letters_as_digits(s) := s if {
	regex.match(`^[0-9]*$`, s)
} else := concat("", [iban_char_digits[c] | some c in split(s, "")])

# Each character an IBAN may hold, as the digits mod-97 reads for it. A table
# lookup, where a function call and a regex match per character made an IBAN
# check the costliest part of a decision (pii_test.rego holds it to the rule).
iban_char_digits := {"0": "0", "1": "1", "2": "2", "3": "3", "4": "4", "5": "5", "6": "6", "7": "7", "8": "8", "9": "9", "A": "10", "B": "11", "C": "12", "D": "13", "E": "14", "F": "15", "G": "16", "H": "17", "I": "18", "J": "19", "K": "20", "L": "21", "M": "22", "N": "23", "O": "24", "P": "25", "Q": "26", "R": "27", "S": "28", "T": "29", "U": "30", "V": "31", "W": "32", "X": "33", "Y": "34", "Z": "35"}

# The remainder of a long decimal number (a string of up to 72 digits) by 97,
# without big integers: the sum of each six-digit chunk times 10^position
# mod 97 (below 10^6 * 97 each, twelve at most: every engine adds them
# exactly). Chunks, not digits: a third of the builtin calls of an IBAN check.
mod97(number) := sum([term |
	some i in numbers.range(0, 11)
	start = i * 6
	start < n
	chunk = substring(number, start, 6)
	size = count(chunk)

	# "1" in front: to_number reads JSON numbers, and refuses "012" on both engines
	term = (to_number(concat("", ["1", chunk])) - pow10_small[size]) * pow10_mod97_table[(n - start) - size]
]) % 97 if {
	n = count(number)
	n <= 72
}

# digit * 10^position mod 97 (below 97 * 9).
digit_mod97(digit, position) := to_number(digit) * pow10_mod97(position)

# 10^k mod 97 for 0 <= k < 72.
pow10_mod97(k) := pow10_mod97_table[k]

# The same, written out: working it out per digit (pow10_mod97_computed)
# cost more than the rest of the check. pii_test.rego holds the two equal.
pow10_mod97_table := [1, 10, 3, 30, 9, 90, 27, 76, 81, 34, 49, 5, 50, 15, 53, 45, 62, 38, 89, 17, 73, 51, 25, 56, 75, 71, 31, 19, 93, 57, 85, 74, 61, 28, 86, 84, 64, 58, 95, 77, 91, 37, 79, 14, 43, 42, 32, 29, 96, 87, 94, 67, 88, 7, 70, 21, 16, 63, 48, 92, 47, 82, 44, 52, 35, 59, 8, 80, 24, 46, 72, 41]

# 10^k mod 97 as (10^8)^a * 10^b with k = 8a + b. Every product stays below
# 2^53 (97^8 < 8e15), so no engine rounds it.
pow10_mod97_computed(k) := (power(100000000 % 97, a) * (pow10_small[b] % 97)) % 97 if {
	b = k % 8
	a = (k - b) / 8
}

pow10_small := [1, 10, 100, 1000, 10000, 100000, 1000000, 10000000]

# base^exponent for a small exponent (0 included).
power(_, 0) := 1

power(base, exponent) := product([base | some _ in numbers.range(1, exponent)]) if exponent > 0

# ---------------------------------------------------------------- patterns

# Non-empty matches of a configured pattern (a national id format).
pattern_matches(pattern, text) := {m |
	some m in distinct_matches(pattern, text)
	m != ""
	bounded(m, text)
}

# ---------------------------------------------------------------- helpers

# Each text `pattern` matches in `text`, once: a text repeating one number
# hundreds of times (a model in a loop) would otherwise have each copy's
# every occurrence checked (bounded), a cost cubic in the text's length.
distinct_matches(pattern, text) := {m | some m in regex.find_n(pattern, text, -1)}

digits_of(s) := regex.replace(s, `[^0-9]`, "")

# Some occurrence of `match` in `text` is not glued to a letter or digit on a
# side where the match itself begins or ends with one. Positions count
# characters (code points) on both engines, as indexof_n and substring do.
#
# The first occurrence is asked first, and the others (`else`) only when it
# is glued: each position costs a substring, which regorus counts from the
# text's start, so asking every occurrence of a number a long text repeats
# was quadratic in the text's length.
bounded(match, text) if {
	free_at(match, text, indexof(text, match))
} else if {
	some start in indexof_n(text, match)
	free_at(match, text, start)
}

free_at(match, text, start) if {
	not glued_before(text, match, start)
	not glued_after(text, match, start)
}

glued_before(text, match, start) if {
	start > 0
	alphanumeric(substring(match, 0, 1))
	alphanumeric(substring(text, start - 1, 1))
}

glued_after(text, match, start) if {
	length = count(match)
	alphanumeric(substring(match, length - 1, 1))
	alphanumeric(substring(text, start + length, 1))
}

# One ASCII digit ("" at either end of the text is none).
digit(char) if {
	char != ""
	contains("0123456789", char)
}

# One ASCII letter or digit ("" at either end of the text is neither).
alphanumeric(char) if {
	char != ""
	contains("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", char)
}
