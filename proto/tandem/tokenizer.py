"""The tokenizer the router and the workers share, so both sides agree on token ids.

Two kinds: `HFTokenizer` reads a checkpoint's `tokenizer.json` (HF `tokenizers`); `ByteTokenizer`
is the tiny model's byte-level vocabulary (ids 0..255 are the bytes, then BOS, EOS, PAD), which
needs no file. `load_tokenizer(checkpoint_dir)` picks by what the checkpoint holds: a
`tokenizer.json` means HF, a `tokenizer_config.json` with `"tokenizer_class": "ByteTokenizer"` (or
no checkpoint at all) means bytes. `IncrementalDecoder` turns a stream of ids into text pieces
without splitting a multi-byte character across two pieces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What serving needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """Byte-level vocabulary: ids 0..255 are bytes; 256 BOS, 257 EOS, 258 PAD."""

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's `tokenizer.json` through HF `tokenizers`."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _HF  # imported here: the byte path needs no library

        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self._tok = _HF.from_file(str(path))
        cfg_path = path.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._bos = self._special_id(cfg.get("bos_token"))
        eos = self._special_id(cfg.get("eos_token"))
        if eos is None:
            raise ValueError(f"{cfg_path}: no eos_token that the vocabulary of {path} knows")
        self._eos = eos

    def _special_id(self, token: object) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if add_bos and self._bos is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")


def load_tokenizer(checkpoint_dir: str | Path | None) -> Tokenizer:
    """The tokenizer of a checkpoint directory; the byte tokenizer when there is none."""
    if checkpoint_dir is None:
        return ByteTokenizer()
    root = Path(checkpoint_dir)
    if (root / "tokenizer.json").is_file():
        return HFTokenizer(root / "tokenizer.json")
    cfg = root / "tokenizer_config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("tokenizer_class") == "ByteTokenizer":
        return ByteTokenizer()
    raise FileNotFoundError(
        f"{root}: no tokenizer.json, and no tokenizer_config.json naming ByteTokenizer"
    )


class IncrementalDecoder:
    """Text pieces for a growing id stream; never splits a UTF-8 character across pieces.

    Decodes the whole sequence each time and emits what became stable: cheap for the short
    pieces a step adds, and exact for tokenizers whose decoding depends on neighbours.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the new complete text (possibly empty)."""
        self._ids.extend(ids)
        raw = self._tok.decode_bytes(self._ids)
        text = _complete_prefix(raw)
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        """The rest, including a trailing incomplete character as U+FFFD."""
        text = self._tok.decode_bytes(self._ids).decode("utf-8", errors="replace")
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece


def _complete_prefix(raw: bytes) -> str:
    """Decode raw up to, not including, a trailing incomplete UTF-8 sequence."""
    tail = 0
    for back in range(1, min(4, len(raw)) + 1):
        b = raw[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: keep looking for its lead byte
            continue
        need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        tail = back if need > back else 0
        break
    return raw[: len(raw) - tail].decode("utf-8", errors="replace")
