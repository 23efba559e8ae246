"""tandem.tokenizer: byte-level and HF tokenizers, incremental decoding that never splits a character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer

pytestmark = pytest.mark.foundation


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Tandem serves DeepSeek-V4: é, €, 𝄞."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 256 and tok.eos_id == 257
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_id]) == text


def test_incremental_decoder_emits_whole_characters_only() -> None:
    tok = ByteTokenizer()
    text = "a€𝄞b"
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in tok.encode(text, add_bos=False)]
    # '€' is 3 bytes and '𝄞' 4: nothing is emitted until a character is complete.
    assert pieces == ["a", "", "", "€", "", "", "", "𝄞", "b"]
    assert "".join(pieces) + dec.flush() == text


def test_incremental_decoder_flushes_a_cut_character() -> None:
    dec = IncrementalDecoder(ByteTokenizer())
    assert dec.push([0xE2, 0x82]) == ""
    assert dec.flush() == "\ufffd"


def _write_hf_tokenizer(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, "<eos>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))


def test_hf_tokenizer_from_checkpoint(tmp_path: Path) -> None:
    _write_hf_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 5)
    assert tok.encode("hello world") == [0, 3, 4]
    assert tok.encode("hello", add_bos=False) == [3]


def test_load_tokenizer_choices(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByteTokenizer"}))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
