"""The HTTP admin routes' `Admin`, backed by the controller actor (calls go over Ray)."""

from __future__ import annotations

from orchestrator.api.admin import DeploymentStatus


class ControllerAdmin:
    """Adapts the controller actor handle to orchestrator.api.admin.Admin."""

    def __init__(self, controller: object) -> None:
        self.controller = controller

    async def status(self) -> DeploymentStatus:
        return DeploymentStatus.model_validate(await self.controller.status.remote())

    async def scale(self, prefill: int | None, decode: int | None) -> DeploymentStatus:
        return DeploymentStatus.model_validate(await self.controller.scale.remote(prefill, decode))

    async def drain(self, worker: str, timeout_s: float) -> DeploymentStatus:
        return DeploymentStatus.model_validate(await self.controller.drain.remote(worker, timeout_s))

    async def down(self) -> None:
        await self.controller.down.remote(wait=False)
