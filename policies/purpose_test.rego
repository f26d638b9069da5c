# Unit tests for purpose.rego: restricted models need a declared purpose.
package govgate.purpose_test

import rego.v1

import data.govgate_test.fixtures.codes
import data.govgate_test.fixtures.decide
import data.govgate_test.fixtures.model_request

restricted(model, purpose) := decide(object.union(model_request(model, ["restricted", "large"]), {
	"principal": {"roles": ["admin"]},
	"request": {"purpose": purpose},
}))

test_untagged_model_needs_no_purpose if {
	d := decide({"principal": {"roles": ["admin"]}})
	d.allow
}

test_model_with_other_tags_needs_no_purpose if {
	d := decide(object.union(model_request("big", ["large"]), {"principal": {"roles": ["admin"]}}))
	d.allow
}

test_restricted_model_without_purpose_denied if {
	d := restricted("big", null)
	codes(d) == {"purpose_required"}
	d.reasons[0].message == "model 'big' is tagged restricted and needs a declared purpose (one of: evaluation, research)"
}

test_empty_purpose_counts_as_none if {
	d := restricted("big", "")
	codes(d) == {"purpose_required"}
}

test_restricted_model_with_allowed_purpose_allowed if {
	d := restricted("big", "research")
	d.allow
}

test_restricted_model_with_other_purpose_denied if {
	d := restricted("big", "marketing")
	codes(d) == {"purpose_not_allowed"}
	d.reasons[0].message == "purpose 'marketing' is not allowed for model 'big' (allowed: evaluation, research)"
}

test_model_purpose_list_replaces_general_list if {
	restricted("legal", "litigation").allow
	codes(restricted("legal", "research")) == {"purpose_not_allowed"}
}

test_model_purpose_list_alone_does_not_require_a_purpose if {
	# "legal" has its own list but no restricted tag
	d := decide(object.union(model_request("legal", []), {"principal": {"roles": ["admin"]}}))
	d.allow
}

test_purpose_that_is_not_a_string_counts_as_none_and_is_reported if {
	d := restricted("big", 7)
	codes(d) == {"purpose_required", "invalid_input"}
}

test_tags_that_are_not_a_list_are_reported if {
	d := decide(object.union(model_request("big", "restricted"), {"principal": {"roles": ["admin"]}}))
	codes(d) == {"invalid_input"}
}
