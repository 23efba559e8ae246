"""Build and load the native simulator core: every `*.c` here, one shared library, cached by the
hash of the sources and flags under $TANDEM_NATIVE_CACHE (default ~/.cache/tandem/native).

Floating point must round exactly as CPython does: no fast-math and no FMA contraction, so a
C expression written in the Python expression's order gives the same double.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O2", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-Wall",
          "-Wextra", "-Wno-unused-parameter")


class NativeBuildError(RuntimeError):
    """The C core could not be compiled or loaded; the message has the compiler's output."""


def _sources() -> list[Path]:
    return sorted([*SOURCE_DIR.glob("*.c"), *SOURCE_DIR.glob("*.h")])


def _cache_dir() -> Path:
    root = os.environ.get("TANDEM_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tandem" / "native"


def library_path() -> Path:
    """Where the library for the current sources lives (built or not)."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for src in _sources():
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return _cache_dir() / f"tandem_simcore-{h.hexdigest()[:16]}.so"


def compiler() -> str:
    """The C compiler: $CC, else cc, else gcc (NativeBuildError naming what is missing)."""
    wanted = os.environ.get("CC")
    cc = shutil.which(wanted) if wanted else shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        named = f"CC={wanted!r} is not an executable" if wanted else "no C compiler (cc or gcc) is on PATH"
        raise NativeBuildError(f"{named}: the planner's native simulator core in {SOURCE_DIR} needs one "
                               "(install gcc, or set CC)")
    return cc


def build() -> Path:
    """Compile the sources (if this version is not built yet); the library's path."""
    out = library_path()
    if out.exists():
        return out
    cc = compiler()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cc, *CFLAGS, "-o", str(tmp_out), *(str(s) for s in SOURCE_DIR.glob("*.c")), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NativeBuildError(f"building the native simulator core failed ({' '.join(cmd)}):\n"
                                   f"{proc.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: concurrent builders of one version agree
    return out


@cache
def load() -> ctypes.CDLL:
    """The loaded library (built first when needed)."""
    path = build()
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeBuildError(f"loading the native simulator core {path} failed: {exc}") from exc
