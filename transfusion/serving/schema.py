"""What the OpenAPI schema says each route answers: every error status with ``ErrorBody`` and why it happens,
Retry-After on 429 / 503, the SSE events of the streaming routes (``x-sse-events``, with their models added to the
components), and the bearer-token security of the /v1 routes.

Routes are module-level, declared before any app (or token) exists, so each /v1 route documents 401; ``openapi_of``
drops it again from the schema of a server that runs without a token, and adds the security scheme to one that runs
with it."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from transfusion.serving.protocol import GENERATE_EVENTS, ChatCompletionChunk, ErrorBody

ERRORS = {
    400: "the request is well-formed but cannot be served as asked: above a server limit (max_tokens, steps, "
         "max_images, guidance, prompt length, input images), a sampler this model cannot use, an undecodable image",
    401: "missing or wrong bearer token (only when the server runs with --token)",
    404: "the model named is not served here (the served id and 'default' are)",
    413: "the request body, or an image's declared size, is above the server's limit",
    422: "the body does not match this schema: unknown fields, values out of bounds, or of another JSON type than "
         "declared (types are strict: 0 is not false, \"5\" is not 5); 'detail' lists where",
    429: "the queue is full: retry after Retry-After seconds",
    499: "the client closed the connection before the answer was ready (logged; that client never reads it)",
    500: "the engine failed while generating this request",
    503: "the engine is not running, or the server is shutting down (then with Retry-After)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
SSE_NOTE = ("; with \"stream\": true, Server-Sent Events (text/event-stream) whose events and data are listed in "
            "x-sse-events")


def documented(codes: tuple[int, ...], ok: type[BaseModel], description: str,
               events: dict[str, dict] | None = None) -> dict[int | str, dict]:
    """FastAPI ``responses=``: 200 with ``ok`` (and SSE ``events`` when the route streams), and every error status in
    ``codes`` with ``ErrorBody``."""
    out: dict[int | str, dict] = {200: {"model": ok, "description": description + (SSE_NOTE if events else "")}}
    if events:
        out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}, "x-sse-events": events}}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": ERRORS[code]}
        if code in (429, 503):
            out[code]["headers"] = RETRY_AFTER
    return out


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


GENERATE_SSE = {name: ref(model) for name, model in GENERATE_EVENTS.items()}
CHAT_SSE = {"message": {"anyOf": [ref(ChatCompletionChunk), ref(ErrorBody), {"const": "[DONE]"}],
                        "description": "chunks, an error object if the stream cannot finish, then [DONE]"}}


def add_event_schemas(schema: dict, models: list[type[BaseModel]]) -> None:
    """Put the SSE event models (named in x-sse-events, which FastAPI does not read) into the schema's components."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, js)


def openapi_of(app: FastAPI) -> dict:
    """``app.openapi``: FastAPI's schema (built once, then cached), with the SSE event models and the bearer token's
    security on the /v1 routes when the server has one (else without their 401)."""
    if app.openapi_schema is None:
        token = app.state.serving.token
        schema = FastAPI.openapi(app)
        add_event_schemas(schema, [*GENERATE_EVENTS.values(), ChatCompletionChunk, ErrorBody])
        if token is not None:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in item.values():
                    if token is None:
                        operation["responses"].pop("401", None)
                    else:
                        operation["security"] = [{"bearer": []}]
    return app.openapi_schema
