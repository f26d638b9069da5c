"""Chat messages to prompt strings and stop sequences."""

from __future__ import annotations

import pytest

from workers.contract.prompts import message_text, render_chat

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Open the gate."},
    {"role": "assistant", "content": "Opened."},
    {"role": "user", "content": "Close it."},
]


def test_plain_transcript() -> None:
    prompt, stops = render_chat(CHAT, "plain")
    assert prompt == (
        "System: Be brief.\n\nUser: Open the gate.\n\nAssistant: Opened.\n\nUser: Close it.\n\nAssistant:"
    )
    assert "\nUser:" in stops
    assert all(s and s.startswith("\n") for s in stops)


def test_chatml() -> None:
    prompt, stops = render_chat(CHAT, "chatml")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nOpen the gate.<|im_end|>\n"
        "<|im_start|>assistant\nOpened.<|im_end|>\n"
        "<|im_start|>user\nClose it.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert stops == ("<|im_end|>",)


def test_list_of_parts_joins_text() -> None:
    parts = [{"type": "text", "text": "Open "}, {"type": "text", "text": "the gate."}]
    as_parts, _ = render_chat([{"role": "user", "content": parts}], "chatml")
    as_string, _ = render_chat([{"role": "user", "content": "Open the gate."}], "chatml")
    assert as_parts == as_string


def test_missing_or_null_content_is_empty() -> None:
    prompt, _ = render_chat([{"role": "user"}, {"role": "assistant", "content": None}], "plain")
    assert prompt == "User: \n\nAssistant: \n\nAssistant:"


def test_no_messages_still_opens_the_assistant_turn() -> None:
    assert render_chat([], "plain")[0] == "Assistant:"
    assert render_chat([], "chatml")[0] == "<|im_start|>assistant\n"


def test_non_text_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="image_url"):
        message_text([{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}])
    with pytest.raises(ValueError):
        message_text(["bare string part"])
    with pytest.raises(ValueError):
        message_text(42)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "x"}],
        [{"content": "no role"}],
        ["not a dict"],
    ],
)
def test_bad_messages_are_refused(messages: list) -> None:
    with pytest.raises(ValueError, match="message 0"):
        render_chat(messages, "plain")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt format"):
        render_chat(CHAT, "vicuna")


def test_alpaca_format_builds_instruction_blocks():
    prompt, stops = render_chat([{"role": "user", "content": "Name a gate."}], "alpaca")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nName a gate.\n\n### Response:\n")
    assert "### Instruction:" in stops


def test_alpaca_format_uses_the_system_message_as_preamble_and_keeps_turns():
    prompt, _ = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "alpaca")
    assert prompt == ("Be brief.\n\n### Instruction:\na\n\n### Response:\nb\n\n### Instruction:\nc"
                      "\n\n### Response:\n")
