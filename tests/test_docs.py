"""The README cannot drift from the code: every setting and every error code is documented there.

Settings are read in one module (``gateway/settings.py``) and refusals are
``ApiError``s with a literal code; a new one that the README does not list
fails here, so an operator never meets a knob or a code the docs do not name.
"""

from __future__ import annotations

import re

import pytest

from gateway.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _configuration_rows() -> set[str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(GOVGATE_[A-Z_]+)` \|", section, flags=re.M))


def _error_codes() -> set[str]:
    codes: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        codes.update(re.findall(r'ApiError\(\s*\d{3},\s*"([a-z_]+)"', path.read_text(encoding="utf-8")))
    return codes


@pytest.mark.parametrize("variable", sorted(f"GOVGATE_{name.upper()}" for name in Settings.__dataclass_fields__))
def test_every_setting_has_a_row_in_the_configuration_table(variable: str) -> None:
    assert variable in _configuration_rows(), f"{variable} is read by gateway/settings.py but not documented"


def test_the_configuration_table_lists_only_real_settings() -> None:
    known = {f"GOVGATE_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert _configuration_rows() - known == set()


def test_every_error_code_the_gateway_raises_is_in_the_readme() -> None:
    codes = _error_codes()
    assert {"invalid_json", "model_not_found", "invalid_value"} <= codes  # the scan finds the refusals
    missing = sorted(code for code in codes if f"`{code}`" not in README)
    assert missing == [], f"error codes the README does not document: {missing}"
