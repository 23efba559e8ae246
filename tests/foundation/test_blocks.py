"""tandem.blocks: chained, salted, process-independent 256-token block hashes."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest

from tandem.blocks import BLOCK_SIZE, block_hashes, extend_block_hashes, root_hash

pytestmark = pytest.mark.foundation


def _tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(129_280) for _ in range(n)]


def test_only_full_blocks_are_hashed() -> None:
    assert BLOCK_SIZE == 256
    assert block_hashes(_tokens(255)) == []
    assert len(block_hashes(_tokens(256))) == 1
    assert len(block_hashes(_tokens(1000))) == 3


def test_matches_an_independent_spelling_of_the_definition() -> None:
    toks = _tokens(600)
    parent = hashlib.blake2b(b"tandem.blocks.v1" + (0).to_bytes(4, "little"), digest_size=8).digest()
    want = []
    for k in range(2):
        blob = b"".join(t.to_bytes(4, "little") for t in toks[256 * k : 256 * (k + 1)])
        parent = hashlib.blake2b(parent + blob, digest_size=8).digest()
        want.append(int.from_bytes(parent, "little"))
    assert block_hashes(toks) == want
    assert root_hash(None) == hashlib.blake2b(b"tandem.blocks.v1" + bytes(4), digest_size=8).digest()


def test_same_tokens_same_hashes_in_another_process() -> None:
    toks = _tokens(1024, seed=7)
    code = (
        "import sys, json; from tandem.blocks import block_hashes; "
        "print(json.dumps(block_hashes(json.loads(sys.stdin.read()), salt='tenant-a')))"
    )
    import json

    # A fresh interpreter has a different PYTHONHASHSEED: Python's hash() would differ, ours must not.
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(toks), capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(out.stdout) == block_hashes(toks, salt="tenant-a")


@pytest.mark.parametrize("k", [0, 1, 3])
def test_change_in_block_k_changes_hashes_k_onward_only(k: int) -> None:
    toks = _tokens(5 * 256, seed=1)
    base = block_hashes(toks)
    changed = list(toks)
    changed[256 * k + 17] ^= 1
    after = block_hashes(changed)
    assert after[:k] == base[:k]
    assert all(a != b for a, b in zip(after[k:], base[k:], strict=True))


def test_salt_changes_every_hash() -> None:
    toks = _tokens(4 * 256, seed=2)
    plain, a, b = block_hashes(toks), block_hashes(toks, salt="a"), block_hashes(toks, salt=b"b")
    assert all(len({x, y, z}) == 3 for x, y, z in zip(plain, a, b, strict=True))
    assert block_hashes(toks, salt="a") == a
    assert block_hashes(toks, salt="a") == block_hashes(toks, salt=b"a")


def test_hashes_are_u64_and_distinct() -> None:
    hs = block_hashes(_tokens(64 * 256, seed=3))
    assert all(0 <= h < 2**64 for h in hs)
    assert len(set(hs)) == len(hs)


def test_bad_token_ids_are_named() -> None:
    with pytest.raises(ValueError, match="-5"):
        block_hashes([1, 2, -5])
    with pytest.raises(ValueError, match=str(2**32)):
        block_hashes([2**32])
    with pytest.raises(TypeError, match="salt"):
        block_hashes([1], salt=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_extending_a_chain_equals_hashing_the_whole_sequence(split: int) -> None:
    """A growing sequence hashes only its new blocks: the chain continued from the last known hash
    equals the whole sequence's chain, salt included (it lives in the parent)."""
    toks = _tokens(5 * 256 + 40, seed=split)
    whole = block_hashes(toks, salt="tenant-a")
    head = block_hashes(toks[: split * 256], salt="tenant-a")
    assert head + extend_block_hashes(head[-1], toks[split * 256 :]) == whole
    assert extend_block_hashes(head[-1], toks[split * 256 : split * 256 + 255]) == []  # no full block yet
    with pytest.raises(ValueError, match="not an unsigned 64-bit int"):
        extend_block_hashes(-1, toks)
