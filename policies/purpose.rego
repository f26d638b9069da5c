# Declared purposes for restricted models.
#
# A model carrying a tag listed in govgate_config.purposes.required_for_tags
# may be used only for a declared purpose (input.request.purpose) from the
# model's own list (govgate_config.models.<name>.purposes) when it has one,
# else from govgate_config.purposes.allowed.
package govgate

import rego.v1

# The requested model's settings ({} when the data has none).
model_settings := settings if {
	settings = object.get(config, ["models", requested_model], null)
	is_object(settings)
} else := {}

# The tags that call for a declared purpose.
required_tags := tags if {
	tags = object.get(config, ["purposes", "required_for_tags"], null)
	is_array(tags)
} else := []

# Tags of the requested model that call for a declared purpose.
purpose_tags contains tag if {
	tags = input.model.tags
	is_array(tags)
	some tag in tags
	tag in required_tags
}

purpose_required if count(purpose_tags) > 0

# The declared purpose; undefined when none was declared.
declared_purpose := input.request.purpose if {
	is_string(input.request.purpose)
	input.request.purpose != ""
}

# Purposes the requested model may be used for: its own list when the data
# gives one, else the general list.
permitted_purposes := as_list(model_settings.purposes) if {
	model_settings.purposes != null
} else := as_list(setting(["purposes", "allowed"]))

purpose_denials contains {"code": "purpose_required", "message": msg} if {
	purpose_required
	not declared_purpose
	msg = sprintf(
		"model '%s' is tagged %s and needs a declared purpose (one of: %s)",
		[model_label, listing(purpose_tags), listing(permitted_purposes)],
	)
}

purpose_denials contains {"code": "purpose_not_allowed", "message": msg} if {
	purpose_required
	declared_purpose
	not declared_purpose in permitted_purposes
	msg = sprintf(
		"purpose '%s' is not allowed for model '%s' (allowed: %s)",
		[declared_purpose, model_label, listing(permitted_purposes)],
	)
}
