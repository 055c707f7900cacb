"""The state every route reads: one ``ServerState`` per app, built by ``create_app`` and kept in
``app.state.serving``. Routes are module-level (``routes_*.py``), so they reach it through the request
(``state_of(request)``) rather than through closures; two apps in one process never share anything.

``authorised`` is the bearer-token dependency of the /v1 routes (a no-op when the server runs without a token)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from transfusion.serving.metrics import Metrics
from transfusion.serving.middleware import Drain
from transfusion.serving.protocol import ServeLimits
from transfusion.serving.scheduler import Scheduler
from transfusion.serving.worker import EngineWorker


@dataclass(kw_only=True, slots=True)
class ServerState:
    """One server: the engine and its thread, the limits, the metrics, the drain, and what /v1/models reports."""

    engine: Any  # transfusion.generation.engine.Engine (typed loosely: tests serve stand-ins)
    worker: EngineWorker
    metrics: Metrics
    drain: Drain
    limits: ServeLimits
    model_name: str
    token: str | None  # a bearer token every /v1 request must carry; None: no authentication
    start_worker: bool  # the lifespan starts (and stops) the engine thread; else the caller runs it
    samplers: tuple[str, ...]
    default_steps: int
    default_guidance: float
    created: int  # unix time the app was built (the model card's "created")

    @classmethod
    def build(cls, engine, *, model_name: str, limits: ServeLimits, token: str | None, worker: EngineWorker | None,
              start_worker: bool) -> ServerState:
        worker = worker or EngineWorker(Scheduler(engine, max_batch=limits.max_batch), max_queue=limits.max_queue)
        sample_cfg = getattr(engine.cfg, "sample", None)
        return cls(engine=engine, worker=worker, metrics=Metrics(worker), drain=Drain(), limits=limits,
                   model_name=model_name, token=token, start_worker=start_worker,
                   samplers=tuple(engine.schedule.samplers), default_steps=getattr(sample_cfg, "steps", 50),
                   default_guidance=getattr(sample_cfg, "guidance", 2.0), created=int(time.time()))


def state_of(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.serving


async def authorised(request: Request) -> None:
    """401 unless the request carries the server's bearer token (compared in constant time)."""
    token = state_of(request).token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
