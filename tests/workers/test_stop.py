"""Stop rules and exact text assembly of StopTracker, with the byte tokenizer."""

from __future__ import annotations

import pytest

from tandem.request import SamplingConfig
from tandem.stream import Finish
from tandem.tokenizer import ByteTokenizer
from workers.engine.stop import StopTracker

pytestmark = pytest.mark.workers

TOK = ByteTokenizer()


def run(params: SamplingConfig, ids: list[int]) -> tuple[list[str], Finish | None, int]:
    """Push ids until the tracker finishes; (pieces, reason, tokens consumed)."""
    t = StopTracker(params, TOK)
    pieces = []
    for n, i in enumerate(ids, 1):
        piece = t.push(i)
        pieces.append(piece.text)
        if piece.finish is not None:
            assert piece.finish is t.finish
            return pieces, piece.finish, n
    return pieces, None, len(ids)


def test_stop_string_cuts_text_exactly_and_never_leaks_a_partial_match() -> None:
    text = "hello wor STOP and more"
    pieces, reason, n = run(SamplingConfig(max_tokens=100, stop=("STOP",)), list(text.encode()))
    assert reason is Finish.STOP
    assert n == text.index("STOP") + 4  # ends on the token completing the stop string
    assert "".join(pieces) == "hello wor "
    # While "S", "ST", "STO" could still become "STOP" nothing of them was released.
    assert all("S" not in p for p in pieces)


def test_false_start_of_a_stop_string_is_released_once_it_diverges() -> None:
    text = "abSTx STOP"
    pieces, reason, _ = run(SamplingConfig(max_tokens=100, stop=("STOP",)), list(text.encode()))
    assert reason is Finish.STOP and "".join(pieces) == "abSTx "
    # "ST" was withheld until "x" showed it is not "STOP".
    assert pieces[2] == "" and pieces[3] == "" and pieces[4] == "STx"


def test_earliest_of_several_stop_strings_wins() -> None:
    text = "one two three"
    pieces, reason, _ = run(SamplingConfig(max_tokens=100, stop=("three", "wo t")), list(text.encode()))
    assert reason is Finish.STOP and "".join(pieces) == "one t"


def test_the_first_completed_stop_string_ends_the_request() -> None:
    # "xab" completes at the third token, before "bcd" could; the text before it is empty.
    pieces, reason, n = run(SamplingConfig(max_tokens=100, stop=("bcd", "xab")), list(b"xabcd"))
    assert reason is Finish.STOP and "".join(pieces) == "" and n == 3


def test_stop_token_id_and_eos_add_no_text() -> None:
    ids = list(b"abc") + [300] + list(b"def")
    pieces, reason, n = run(SamplingConfig(max_tokens=100, stop_token_ids=(300,)), ids)
    assert (reason, n, "".join(pieces)) == (Finish.STOP, 4, "abc")
    pieces, reason, n = run(SamplingConfig(max_tokens=100), list(b"ab") + [TOK.eos_id, 65])
    assert (reason, n, "".join(pieces)) == (Finish.STOP, 3, "ab")
    pieces, reason, n = run(SamplingConfig(max_tokens=4, ignore_eos=True), list(b"ab") + [TOK.eos_id, 65])
    assert (reason, n, "".join(pieces)) == (Finish.LENGTH, 4, "abA")


def test_max_tokens_ends_with_length_and_flushes_text() -> None:
    pieces, reason, n = run(SamplingConfig(max_tokens=3), list(b"abcdef"))
    assert (reason, n, "".join(pieces)) == (Finish.LENGTH, 3, "abc")


def test_multibyte_character_is_never_split_across_pieces() -> None:
    text = "x\u00e9\u4e2dy"  # 1 + 2 + 3 + 1 bytes
    pieces, reason, _ = run(SamplingConfig(max_tokens=7), list(text.encode()))
    assert reason is Finish.LENGTH and "".join(pieces) == text
    assert pieces == ["x", "", "\u00e9", "", "", "\u4e2d", "y"]


def test_stop_string_with_multibyte_characters() -> None:
    text = "caf\u00e9 \u00e9t\u00e9"
    pieces, reason, _ = run(SamplingConfig(max_tokens=100, stop=("\u00e9t",)), list(text.encode()))
    assert reason is Finish.STOP and "".join(pieces) == "caf\u00e9 "


def test_push_after_finish_raises() -> None:
    t = StopTracker(SamplingConfig(max_tokens=1), TOK)
    assert t.push(65).finish is Finish.LENGTH
    with pytest.raises(RuntimeError, match="already finished"):
        t.push(66)
