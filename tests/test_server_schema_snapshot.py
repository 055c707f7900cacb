"""The OpenAPI schema is the server's contract with generated clients: it must not drift by accident. The snapshot
(``tests/snapshots/openapi.json``) was dumped from ``create_app(...).openapi()`` before the serving package was
split into routers (issue 27); a route, status, header or body that changes since fails here. A deliberate change
regenerates it: ``python tests/test_server_schema_snapshot.py`` (and the diff goes through review)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_serving, when run as a script
from test_serving import engine  # noqa: E402

from transfusion.serving.protocol import ServeLimits  # noqa: E402
from transfusion.serving.server import create_app  # noqa: E402

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "openapi.json"


def schemas() -> dict:
    """The schema without and with a bearer token (the token adds a security scheme and a 401 on every /v1 route)."""
    plain = create_app(engine(), model_name="tiny", limits=ServeLimits(max_steps=20, max_tokens=64))
    return {"no_token": plain.openapi(), "token": create_app(engine(), token="s3cret").openapi()}


def test_openapi_schema_equals_the_snapshot():
    expected = json.loads(SNAPSHOT.read_text())
    got = json.loads(json.dumps(schemas()))  # int status keys become strings, as in the file
    for variant in ("no_token", "token"):
        assert sorted(got[variant]["paths"]) == sorted(expected[variant]["paths"]), variant
        for path, item in expected[variant]["paths"].items():
            assert got[variant]["paths"][path] == item, (variant, path)
        assert got[variant] == expected[variant], variant
    assert expected["token"] != expected["no_token"]  # the snapshot holds both variants, not one twice


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(schemas(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
