"""Every error the server answers is one JSON object, ``{"error": {"message", "code"[, "detail"]}}`` (``ErrorBody``,
OpenAI's shape: ``openai_format.error_body``). ``install_error_handlers`` maps the exceptions that reach FastAPI onto
it: HTTPException (401 / 429 / 503 raised by the routes, 404 / 405 of unknown routes), ``BadRequest`` (400 / 413 of
the limits), and the 422 of a request that does not match the schema."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfusion.serving.openai_format import error_body, validation_error_body
from transfusion.serving.protocol import BadRequest


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error body (``ErrorBody``)."""
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """401 / 429 / 503 raised by the routes, and 404 / 405 of unknown routes: the one error body."""
    return error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))


async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
    return error(e.status, str(e))


async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """422 with where and what, never echoing the input (it may be huge, or NaN / inf that JSON cannot carry)."""
    return JSONResponse(validation_error_body(e.errors()), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(RequestValidationError, invalid)
