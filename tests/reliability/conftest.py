"""Fixtures of the reliability tests: one set of throwaway certificates per session."""

from __future__ import annotations

import pytest
from support.certs import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
