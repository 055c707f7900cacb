"""The routes around generation: the web page (``/``), ``/health`` (for a load balancer: 503 once the engine stopped or
the server drains), ``/metrics`` (Prometheus), and ``/v1/models`` (what is served, OpenAI's list shape). Declared in
this order so the schema lists its paths as it always has."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from transfusion.serving.protocol import Health, ModelList
from transfusion.serving.schema import documented
from transfusion.serving.state import ServerState, authorised, state_of

STATIC = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/health", responses={200: {"model": Health, "description": "the engine thread runs"},
                                  503: {"model": Health, "description": "the engine stopped, or the server drains"}})
async def health(request: Request):
    state = state_of(request)
    worker = state.worker
    status = "engine stopped" if not worker.alive else "draining" if state.drain.draining else "ok"
    body = {"status": status, **worker.load(), "model": state.model_name}
    if worker.error:
        body["error"] = worker.error
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request):
    return Response(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", dependencies=[Depends(authorised)],
            responses=documented((401, 503), ModelList, "the served model"))
async def models(request: Request):
    return model_list(state_of(request))


def model_list(state: ServerState) -> dict:
    """``/v1/models``: the one served model ("default" its alias), with what a client needs to ask it well."""
    h, w = state.engine.image_size
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "transfusion", "aliases": ["default"],
                                        "image_size": [h, w], "max_batch": state.limits.max_batch,
                                        "samplers": list(state.samplers), "default_steps": state.default_steps,
                                        "default_guidance": state.default_guidance}]}

