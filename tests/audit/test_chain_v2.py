"""Chain format 2 on both backends: the payload (texts) apart from the chained body, only its digest chained."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from audit import AuditStore, InvalidEntryError, verify_chain
from audit.chain import (
    FORMAT_2,
    HASHED_FIELDS_V2,
    canonical_text,
    chain_hash,
    document_hash,
    entry_hash,
    entry_payload,
    entry_payload_with_body,
)
from tests.audit.conftest import RawDB

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo ✓ \"quoted\""}]


def _append(store: AuditStore, request_id: str = "r1", payload: Any = None, kind: str = "request") -> Any:
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny",
                        body={"decision": {"allow": True}, "prompt_logging": "full"}, policy_revision="rev-1",
                        payload=payload)


def _stored(raw: RawDB, seq: int) -> tuple[Any, ...]:
    """``(body, payload, payload_digest, hash, prev_hash)`` as stored, the JSON columns as their text."""
    [row] = raw.rows("SELECT CAST(body AS TEXT), CAST(payload AS TEXT), payload_digest, hash, prev_hash"
                     " FROM audit_entries WHERE seq = :seq", {"seq": seq})
    return row


def test_payload_is_stored_salted_and_only_its_digest_is_chained(store: AuditStore, raw: RawDB) -> None:
    entry = _append(store, payload={"messages": MESSAGES})
    body_text, payload_text, digest, stored_hash, prev_hash = _stored(raw, entry.seq)

    payload = json.loads(payload_text)
    assert payload == entry.payload and payload["messages"] == MESSAGES
    assert len(payload["salt"]) == 32 and int(payload["salt"], 16) >= 0
    assert payload_text == canonical_text(payload)  # canonical, byte for byte
    assert digest == entry.payload_digest == hashlib.sha256(payload_text.encode("utf-8")).hexdigest()
    assert "héllo" not in body_text  # the text is not in the chained body

    others = {k: v for k, v in entry.hashed_fields().items() if k != "body"}
    assert set(entry.hashed_fields()) == set(HASHED_FIELDS_V2) and entry.format == FORMAT_2
    assert stored_hash == chain_hash(prev_hash, entry_payload_with_body(others, body_text, format=FORMAT_2))
    assert stored_hash == entry_hash(entry.hashed_fields(), format=FORMAT_2) == entry.expected_hash()
    assert store.get(entry.seq) == entry and store.terminal_for("r1") is None
    assert verify_chain(store).ok


def test_the_same_text_twice_has_two_different_digests(store: AuditStore) -> None:
    """The salt: a short prompt's digest cannot be confirmed by hashing guesses."""
    first, second = (_append(store, f"r{i}", payload={"prompt": "yes"}) for i in range(2))
    assert first.payload["salt"] != second.payload["salt"]
    assert first.payload_digest != second.payload_digest
    assert hashlib.sha256(canonical_text({"prompt": "yes"}).encode()).hexdigest() not in (
        first.payload_digest, second.payload_digest)


def test_an_entry_without_payload_has_neither_column(store: AuditStore, raw: RawDB) -> None:
    entry = _append(store)
    assert (entry.payload, entry.payload_digest, entry.payload_erased) == (None, None, False)
    assert _stored(raw, entry.seq)[1:3] == (None, None)
    assert verify_chain(store).ok


@pytest.mark.parametrize("payload", [{"salt": "mine"}, ["not", "a", "mapping"], {"x": float("nan")},
                                     {"x": "\ud800"}, {"x": object()}])
def test_bad_payloads_are_refused_and_nothing_recorded(store: AuditStore, payload: Any) -> None:
    with pytest.raises(InvalidEntryError):
        _append(store, payload=payload)
    assert store.head() is None


def test_erasing_a_payload_keeps_the_chain_verifying(store: AuditStore, raw: RawDB) -> None:
    entries = [_append(store, f"r{i}", payload={"prompt": f"question {i}"}) for i in range(5)]
    # Guards in place: this is the one UPDATE they allow.
    raw.execute("UPDATE audit_entries SET payload = NULL WHERE seq = :seq", {"seq": entries[2].seq})
    erased = AuditStore(store.engine).get(entries[2].seq)
    assert erased is not None and erased.payload is None and erased.payload_erased
    assert erased.payload_digest == entries[2].payload_digest and erased.hash == entries[2].hash
    result = verify_chain(store)
    assert result.ok and result.checked == 6


def test_documents_rehash_to_the_stored_hash_in_both_formats(store: AuditStore) -> None:
    entry = _append(store, payload={"output": "x"}, kind="completion")
    boundary = store.get(1)
    assert boundary is not None and boundary.format == 1
    for e in (boundary, entry):
        document = json.loads(json.dumps(e.to_document()))
        assert document_hash(document) == e.hash
        assert document["format"] == e.format
    # Format 2 of a parsed body is the splice of its canonical text.
    fields = {**entry.hashed_fields()}
    assert entry_payload(fields, format=FORMAT_2) == entry_payload_with_body(
        {k: v for k, v in fields.items() if k != "body"}, canonical_text(entry.body), format=FORMAT_2)
    with pytest.raises(ValueError, match="unknown audit chain format"):
        entry_hash(fields, format=3)


def test_the_first_append_to_a_new_store_writes_the_boundary_first(store: AuditStore) -> None:
    entry = _append(store)
    boundary = store.get(1)
    assert boundary is not None
    assert (boundary.kind, boundary.request_id, boundary.body, boundary.format) == (
        "chain_format", "chain-format-2", {"format": 2}, 1)
    assert (entry.seq, entry.prev_hash) == (2, boundary.hash)
    assert store.boundary_seq() == 1 and store.format_of(1) == 1 and store.format_of(2) == 2
    result = verify_chain(store)
    assert (result.ok, result.format_boundary, result.head_seq, result.head_hash) == (True, 1, 2, entry.hash)
