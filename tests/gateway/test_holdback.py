"""The hold-back's rules, piece by piece: what a client may receive of a checked output, and masked how."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.policy.decision import Reason, Redaction
from gateway.requests.normalize import normalize
from gateway.requests.holdback import OUTPUT_UNMASKABLE, STREAM_INCONSISTENT, HoldBack, Window

CARD = "4111 1111 1111 1111"


@dataclass(frozen=True)
class Decided:
    """An output decision as the engines return it (allow, reasons, redact)."""

    allow: bool = True
    reasons: tuple[Reason, ...] = ()
    redact: tuple[Redaction, ...] = ()
    log_redact: tuple[Redaction, ...] = ()


def judge(text: str) -> Decided:
    """A detector over the window's text: the card number is redacted wherever it is whole."""
    return Decided(redact=(Redaction("payment_card", CARD),) if CARD in text else ())


def stream(hold: HoldBack, pieces: list[str]) -> list[str]:
    """Feed pieces, judging whenever a window is due; the texts released (empty ones left out)."""
    out = []
    for piece in pieces:
        hold.add(piece)
        if hold.due():
            window = hold.window()
            released = hold.apply(window, judge(window.text))
            if released:
                out.append(released)
    window = hold.window(final=True)
    out.append(hold.apply(window, judge(window.text)))
    return out


def test_nothing_is_released_before_a_window_past_it_was_judged() -> None:
    hold = HoldBack(16, 8)
    hold.add("a" * 23)
    assert not hold.due()
    hold.add("b")
    assert hold.due()
    released = hold.apply(hold.window(), Decided())
    assert released == "a" * 8 and hold.released == 8  # the last 16 characters stay held


def test_a_finding_split_across_pieces_is_masked_and_never_released_in_part() -> None:
    text = "my card is " + CARD + " and that is all there is to say about it, really."
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]  # the number arrives in seven pieces
    hold = HoldBack(len(CARD) + 1, 4)
    released = stream(hold, pieces)
    assert "".join(released) == text.replace(CARD, "[REDACTED:payment_card]")
    for part in released:  # no released piece ends with a prefix of the number
        assert not any(part.endswith(CARD[:n]) for n in range(2, len(CARD)))


def test_the_release_point_moves_back_to_the_start_of_a_finding_that_crosses_it() -> None:
    hold = HoldBack(8, 4)
    hold.add("x" * 10 + CARD + "yy")  # 31 characters: the release point (23) falls inside the number
    released = hold.apply(hold.window(), judge(hold.text))
    assert released == "x" * 10 and hold.released == 10


def test_a_stop_releases_nothing_more_and_the_folded_decision_says_why() -> None:
    hold = HoldBack(8, 4)
    hold.add("a" * 12)
    assert hold.apply(hold.window(), Decided()) == "aaaa"
    hold.add("b" * 12)
    stop = Decided(allow=False, reasons=(Reason("output_blocked", "a blocked pattern"),))
    assert hold.apply(hold.window(), stop) == ""
    hold.add("c" * 12)
    assert not hold.due()
    assert hold.apply(hold.window(final=True), Decided()) == ""
    assert hold.client_text == "aaaa" and hold.stopped
    assert hold.decision_document() == {"allow": False, "reasons": [
        {"code": "output_blocked", "message": "a blocked pattern"}], "redact": []}


def test_a_finding_only_in_the_normalised_view_stops_the_output() -> None:
    hold = HoldBack(8)
    hold.add("4111\u200b1111")
    decision = Decided(redact=(Redaction("payment_card", "41111111"),))
    assert hold.apply(hold.window(final=True), decision) == ""
    assert hold.stopped and hold.decision_document()["reasons"][0]["code"] == OUTPUT_UNMASKABLE


def test_a_report_that_contradicts_what_was_released_stops_the_output() -> None:
    hold = HoldBack(4, 2)
    hold.add("abcdefgh")
    hold.apply(hold.window(), Decided())
    assert hold.client_text == "abcd"
    assert hold.replace_text("abcdefghij")  # pieces were lost: the report completes them
    assert not hold.replace_text("zzzzefghij")
    assert hold.stopped and hold.decision_document()["reasons"][0]["code"] == STREAM_INCONSISTENT


@pytest.mark.parametrize("holdback", [len(CARD), len(CARD) + 1, 64, 500])
def test_a_hold_back_as_long_as_the_finding_always_masks_it(holdback: int) -> None:
    text = ("word " * 20) + CARD + (" tail" * 10)
    for size in (1, 2, 7):
        released = stream(HoldBack(holdback), [text[i:i + size] for i in range(0, len(text), size)])
        assert "".join(released) == text.replace(CARD, "[REDACTED:payment_card]")


def test_a_window_knows_where_it_ends() -> None:
    assert Window("abc", 5, False).end == 8


def test_a_stop_keeps_its_findings_so_the_log_can_mask_them() -> None:
    hold = HoldBack(8)
    hold.add("pay with " + CARD)
    stop = Decided(allow=False, reasons=(Reason("output_pii_detected", "a card"),),
                   redact=(Redaction("payment_card", CARD),))
    assert hold.apply(hold.window(final=True), stop) == ""
    assert hold.redact == [{"detector": "payment_card", "text": CARD}]


def stop_on_compact(secret: str):
    """A detector that, like the policy, reads the window's normalised view with spacing removed."""
    def judge_view(text: str) -> Decided:
        view = normalize(text).replace(" ", "").replace("\n", "")
        if secret in view:
            return Decided(allow=False, reasons=(Reason("output_pii_detected", "a secret"),))
        return Decided()
    return judge_view


def stream_judged(hold: HoldBack, pieces: list[str], judge_view) -> str:
    for piece in pieces:
        hold.add(piece)
        if hold.due():
            window = hold.window()
            hold.apply(window, judge_view(window.text))
    window = hold.window(final=True)
    hold.apply(window, judge_view(window.text))
    return hold.client_text


@pytest.mark.parametrize("padding", ["\u200b" * 5, "\u200b\u2060\u200d\u00ad", "  \n\n", "\n" * 6, "\t \u00a0\u2009"])
@pytest.mark.parametrize("secret", ["4111111111111111", "-----BEGINRSAPRIVATEKEY-----"])
def test_a_finding_padded_past_the_hold_back_with_characters_the_rules_do_not_see_is_never_released_in_part(
        padding: str, secret: str) -> None:
    # Raw, the padded secret is far longer than the 64 characters held back; the rules see 16 or 28.
    spelled = secret.replace("RSAPRIVATEKEY", "RSA PRIVATE KEY").replace("BEGIN", "BEGIN ")
    padded = padding.join(spelled)
    assert len(padded) > 64
    lead = "word " * 20 + "here you are:"
    text = lead + " " + padded + " and that is the whole of it, nothing more to add here at all."
    for size in (1, 3, 8):
        hold = HoldBack(64)
        released = stream_judged(hold, [text[i:i + size] for i in range(0, len(text), size)],
                                 stop_on_compact(secret))
        assert hold.stopped
        seen = normalize(released).replace(" ", "").replace("\n", "")
        assert seen and lead.replace(" ", "").startswith(seen), (padding, size, seen)  # some of the lead, none of the secret


def test_findings_only_the_log_masks_are_released_as_they_are_and_folded_for_the_log() -> None:
    """``log_redact`` (an allowed finding of a request logged ``redacted``) is the audit's business only: the
    client gets the text unmasked, the folded decision lists it once, and not when ``redact`` has it too."""
    email, text = "ops@example.com", "write to ops@example.com, card " + CARD + ", or ops@example.com again"
    hold = HoldBack(8, 4)
    hold.add(text)
    found = Decided(redact=(Redaction("payment_card", CARD),),
                    log_redact=(Redaction("email", email), Redaction("email", email), Redaction("payment_card", CARD)))
    released = hold.apply(hold.window(final=True), found)
    assert released == text.replace(CARD, "[REDACTED:payment_card]")
    assert hold.decision_document() == {"allow": True, "reasons": [],
                                        "redact": [{"detector": "payment_card", "text": CARD}],
                                        "log_redact": [{"detector": "email", "text": email}]}
    plain = HoldBack(8, 4)
    plain.add("nothing here")
    plain.apply(plain.window(final=True), Decided())
    assert "log_redact" not in plain.decision_document()  # as before it existed: a worker of before reads it
