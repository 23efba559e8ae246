"""The base of every deployment-spec model: unknown keys are mistakes, and specs never change."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A spec section: `extra="forbid"` (a misspelt key is reported, not ignored), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
