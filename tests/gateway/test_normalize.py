"""The normalised view of prompt text (gateway/normalize.py) and where it goes.

The Rego tests and the two-engine case table give the rules a text and its
normalised view; the pairs here and the check over the case table make sure
those views are the ones the gateway really computes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from audit import AuditEntry
from gateway.requests.audit_records import logged_prompt
from workers.contract.privacy import Digester
from gateway.auth import Principal
from gateway.requests.normalize import normalize, normalized_text
from gateway.requests.policy_input import build_input, with_normalized_text, without_prompt
from gateway.replay import input_from_entry
from tests.policy.test_policy_cases import CASE_DIR
from workers.contract.registry import ModelSpec

# (text as sent, its normalised view): the evasions of the content rules' tests.
PAIRS = [
    ("-----begin pgp private key block-----", "-----begin pgp private key block-----"),
    ("-----BEGIN RSA PRI\u200bVATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("-----BEGIN\u00a0RSA\u00a0PRIVATE\u00a0KEY-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("-----BEGIN RSA \u0420RIV\u0410TE KEY-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("-----BEGIN\tRSA\tPRIVATE\tKEY-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("- - - - - B E G I N  P R I V A T E  K E Y - - - - -", "- - - - - B E G I N P R I V A T E K E Y - - - - -"),
    ("ssn 123\u201045\u20116789 or 123\u201345\u22126789", "ssn 123-45-6789 or 123-45-6789"),
    ("ssn \uff11\uff12\uff13-\uff14\uff15-\uff16\uff17\uff18\uff19", "ssn 123-45-6789"),
    ("card 4111\u200b1111\u200b1111\u200b1111", "card 4111111111111111"),
    ("card \uff14\uff11\uff11\uff11\u00a01111\u00a01111\u00a01111", "card 4111 1111 1111 1111"),
    ("mail \u0430nn@example.org", "mail ann@example.org"),
    ("-----\u0299\u1d07\u0262\u026a\u0274 \u0280\ua731\u1d00 \u1d18\u0280\u026a\u1d20\u1d00\u1d1b\u1d07 \u1d0b\u1d07\u028f-----",
     "-----BEGIN RSA PRIVATE KEY-----"),
    ("-----BEG\u0130N RSA PR\u0130VATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("\u2500\u2500\u2500\u2501\u23afBEGIN RSA PRIVATE KEY\u2796\u2500\u2500\u2500\u2500", "-----BEGIN RSA PRIVATE KEY-----"),
    ("-----BE\u050cIN RSA PRI\u0474ATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("-----BE\u0301GIN RSA PRI\u0308VATE KE\u0300Y-----", "-----BEGIN RSA PRIVATE KEY-----"),
    ("ssn 1\u20e32\u20dd3-4\u03015-6789", "ssn 123-45-6789"),
]


@pytest.mark.parametrize(("text", "view"), PAIRS)
def test_the_pairs_the_rego_tests_use_are_what_the_gateway_computes(text: str, view: str) -> None:
    assert normalize(text) == view


def test_invisible_characters_are_removed() -> None:
    hidden = "a\u200bb\u200cc\u200dd\u2060e\ufefff\u00adg\u202eh\u2066i\u0332\u115fj\u2800k\x00l\x7fm"
    assert normalize(hidden) == "abcdefghijklm"


def test_line_breaks_become_newlines_and_spacing_folds() -> None:
    assert normalize("a\r\nb\rc\x0bd\x0ce\x85f\u2028g\u2029h") == "a\nb\nc\nd\ne\nf\ng\nh"
    assert normalize("a \t\u00a0\u2003\u3000 b\n\n c") == "a b\n\n c"
    assert normalize("plain ascii  text\twith\r\nbreaks\x01") == "plain ascii text with\nbreaks"


def test_digits_of_every_script_and_dashes_fold_to_ascii() -> None:
    assert normalize("\u0661\u0662\u0663 \u0967\u0968 \U0001d7cf\u2460") == "123 12 11"
    assert normalize("a\u2010b\u2011c\u2012d\u2013e\u2014f\u2212g\ufe63h\uff0di") == "a-b-c-d-e-f-g-h-i"


def test_nfkc_and_look_alike_letters() -> None:
    assert normalize("\uff30\uff32\uff29\uff36\uff21\uff34\uff25 \ufb01le \u212a") == "PRIVATE file K"
    assert normalize("\u0391\u0392\u0395 \u03bf\u03c1 \u0410\u0412\u0421 \u0430\u0435\u043e") == "ABE op ABC aeo"


def test_case_and_other_scripts_are_kept() -> None:
    assert normalize("Héllo Wörld ÄÖÜ") == "Héllo Wörld ÄÖÜ"
    assert normalize("日本語のテキスト") == "日本語のテキスト"


def test_messages_are_normalised_one_by_one_and_joined_with_a_newline() -> None:
    messages = [{"role": "system", "content": "be\u00a0brief"}, {"role": "user", "content": "PRI\u200bV"}]
    assert normalized_text(messages, None) == "be brief\nPRIV"
    assert normalized_text(None, "\uff41") == "a"
    assert normalized_text(None, None) == ""


def test_every_case_in_the_table_carries_the_gateways_view() -> None:
    checked = 0
    for path in sorted(CASE_DIR.glob("*.json")):
        for case in json.loads(path.read_text(encoding="utf-8")):
            request = case["input"].get("request", {}) if isinstance(case["input"], dict) else {}
            if "normalized_text" in request:
                assert request["normalized_text"] == normalized_text(request.get("messages"), request.get("prompt")), \
                    f"{path.name}::{case['name']}"
                checked += 1
    assert checked >= 15


# ---------------------------------------------------------------- where the view goes


def _input(messages: list[dict[str, str]]) -> dict:
    principal = Principal(id="u-1", team=None, roles=("analyst",), key_id="k-1")
    spec = ModelSpec(name="govgate-tiny", path=Path("/nonexistent.gguf"))
    return build_input(principal=principal, endpoint="chat.completions", model=spec, max_tokens=8,
                       stream=False, purpose=None, messages=messages)


def test_policy_input_carries_the_view_and_the_stored_copy_does_not() -> None:
    document = _input([{"role": "user", "content": "card 4111\u200b1111"}])
    assert document["request"]["normalized_text"] == "card 41111111"
    assert document["request"]["text"] == "card 4111\u200b1111"
    stored = without_prompt(document)
    assert not {"text", "normalized_text", "messages"} & stored["request"].keys()


def test_hand_written_input_gets_the_view_filled_in() -> None:
    filled = with_normalized_text({"request": {"text": "a\u00a0b"}})
    assert filled["request"]["normalized_text"] == "a b"
    given = {"request": {"text": "a\u00a0b", "normalized_text": "x"}}
    assert with_normalized_text(given) == given
    assert with_normalized_text(["not", "an", "object"]) == ["not", "an", "object"]


def test_replay_rebuilds_the_view_of_a_fully_logged_prompt() -> None:
    messages = [{"role": "user", "content": "PRI\u200bVATE"}]
    stored = without_prompt(_input(messages))
    entry = AuditEntry(seq=1, created_at=datetime.now(timezone.utc), request_id="r", kind="request",
                       principal="u-1", team=None, model="govgate-tiny",
                       body={"policy_input": stored, "prompt_logging": "full", "messages": messages},
                       policy_revision="x", terminal_request_id=None, prev_hash="", hash="")
    document, complete = input_from_entry(entry)
    assert complete
    assert document["request"]["normalized_text"] == "PRIVATE"


# ---------------------------------------------------------------- redaction of what the view found

#: A keyed digester with a fixed test key: stored digests are HMACs, never plain SHA-256.
DIGESTER = Digester(b"k" * 32)


def test_redacted_prompt_replaces_findings_spelt_as_sent() -> None:
    stored = logged_prompt([{"role": "user", "content": "mail ann@example.org now"}], None, "redacted",
                           [{"detector": "email", "text": "ann@example.org"}], DIGESTER)
    assert stored == {"prompt_logging": "redacted", "redacted": ["email"],
                      "messages": [{"role": "user", "content": "mail [REDACTED:email] now"}]}


@pytest.mark.parametrize("content", ["card 4111\u200b1111\u200b1111\u200b1111",
                                     "mail \u0430nn@example.org and ann@example.org"])
def test_redacted_prompt_is_withheld_when_a_finding_is_spelt_otherwise(content: str) -> None:
    found = normalize(content).split(" ")[1]
    stored = logged_prompt([{"role": "user", "content": content}], None, "redacted",
                           [{"detector": "x", "text": found}], DIGESTER)
    assert stored == {"prompt_logging": "redacted", "redacted": ["x"], "prompt_withheld": True,
                      "prompt_hmac_sha256": DIGESTER.hexdigest(content)}
    assert found not in json.dumps(stored, ensure_ascii=False)
