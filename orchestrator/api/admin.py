"""Admin endpoints (admin token only): GET /v1/status, POST /v1/scale, /v1/drain, /v1/down.

They drive whatever implements `Admin` (the controller in a deployment). The status shape is the
one `tandem status --json` prints.
"""

from __future__ import annotations

from typing import Literal, Protocol

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.api.auth import Auth


class InstanceStatus(BaseModel):
    id: str
    role: Literal["prefill", "decode"]
    ranks: int
    state: Literal["starting", "ready", "draining", "dead"]
    running: int = 0
    queued: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    generation: int = 1  # the config generation it was started with (rolling spec updates)


class PoolDecisionStatus(BaseModel):
    current: int
    target: int
    need: int
    reason: str  # orchestrator.autoscale.policy.Reason value
    detail: str


class DecisionStatus(BaseModel):
    at_s: float
    prefill: PoolDecisionStatus
    decode: PoolDecisionStatus


class AutoscaleStatus(BaseModel):
    enabled: bool = False
    interval_s: float | None = None
    errors: int = 0
    last: DecisionStatus | None = None
    changes: list[DecisionStatus] = []  # the recent decisions that changed a pool


class DeploymentStatus(BaseModel):
    name: str
    ready: bool  # every instance can serve
    router_address: str
    http_address: str
    instances: list[InstanceStatus]
    prefix_hit_rate: float = 0.0
    kv_transfer_bytes: int = 0
    generation: int = 1
    autoscale: AutoscaleStatus = AutoscaleStatus()


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefill: int | None = Field(default=None, ge=0, le=4096)
    decode: int | None = Field(default=None, ge=1, le=4096)

    @model_validator(mode="after")
    def _some(self) -> ScaleRequest:
        if self.prefill is None and self.decode is None:
            raise ValueError("give prefill, decode or both")
        return self


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker: str = Field(min_length=1, max_length=128)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)


class Admin(Protocol):
    async def status(self) -> DeploymentStatus: ...
    async def scale(self, prefill: int | None, decode: int | None) -> DeploymentStatus: ...
    async def drain(self, worker: str, timeout_s: float) -> DeploymentStatus: ...
    async def down(self) -> None: ...


def make_admin_router(admin: Admin, auth: Auth) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth.admin)])

    @api.get("/v1/status")
    async def status() -> DeploymentStatus:
        return await admin.status()

    @api.post("/v1/scale")
    async def scale(body: ScaleRequest) -> DeploymentStatus:
        return await admin.scale(body.prefill, body.decode)

    @api.post("/v1/drain")
    async def drain(body: DrainRequest) -> DeploymentStatus:
        return await admin.drain(body.worker, body.timeout_s)

    @api.post("/v1/down")
    async def down() -> dict:
        await admin.down()
        return {"down": True}

    return api
