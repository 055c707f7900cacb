"""The server's contract with a client generated from its OpenAPI schema: every status a route can answer is listed
with the error body's schema, declared types are strict (no silent coercion), the schema's examples are requests
the server serves, unseeded requests draw a fresh seed and say which (so they replay), and a schema-driven fuzzer
(``tools/fuzz_serve.py``) finds no 5xx and no answer the schema contradicts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema", reason="the contract tests need the 'dev' extra")

from fastapi.testclient import TestClient  # noqa: E402
from test_server import GEN, app, client, png_b64, sse_events  # noqa: E402,F401  (app, client: the same fixtures)
from test_serving import engine  # noqa: E402

from transfusion.serving.protocol import ServeLimits  # noqa: E402
from transfusion.serving.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fuzz_module():
    """tools/fuzz_serve.py (a script, not a package module)."""
    if "fuzz_serve" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fuzz_serve", ROOT / "tools" / "fuzz_serve.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fuzz_serve"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["fuzz_serve"]


@pytest.fixture(scope="module")
def schema(client):
    return client.get("/openapi.json").json()


def resolved(schema: dict, node):
    return fuzz_module().inline_refs(node, schema)


def error_schema_of(schema: dict, path: str, method: str, status: str) -> dict:
    return resolved(schema, schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"])


# -- every status, with the error body's schema ------------------------------------------------------------------------
ROUTES = {("/v1/generate", "post"): {"200", "400", "413", "422", "429", "499", "500", "503"},
          ("/v1/chat/completions", "post"): {"200", "400", "404", "413", "422", "429", "499", "500", "503"},
          ("/v1/models", "get"): {"200", "503"},
          ("/health", "get"): {"200", "503"}}


def test_openapi_lists_every_status_with_the_error_body(schema):
    for (path, method), codes in ROUTES.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) == codes, (path, sorted(responses))
        for status in codes - {"200"} if path != "/health" else ():
            body = error_schema_of(schema, path, method, status)
            jsonschema.validate({"error": {"message": "m", "code": int(status)}}, body)
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate({"detail": "FastAPI's default shape"}, body)
        for status in ("429", "503"):
            if status in responses and path.startswith("/v1/"):
                assert "Retry-After" in responses[status].get("headers", {}), (path, status)
    streamed = schema["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}
    assert {"text", "image_start", "preview", "image", "done", "error"} <= set(streamed["text/event-stream"]
                                                                                ["x-sse-events"])


def test_401_is_documented_and_answered_in_the_error_shape():
    with TestClient(create_app(engine(), token="s3cret")) as c:
        schema = c.get("/openapi.json").json()
        for path, method in (("/v1/generate", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")):
            assert "401" in schema["paths"][path][method]["responses"], path
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        jsonschema.validate(r.json(), error_schema_of(schema, "/v1/models", "get", "401"))
        assert r.json()["error"]["code"] == 401


def test_error_bodies_of_every_kind_validate(client, schema):
    """400 (a limit), 404 (model), 422 (shape), 429 (queue full) and 503 (engine stopped) answer the documented
    error body."""
    cases = [("/v1/generate", {**GEN, "steps": 21}, 400), ("/v1/generate", {**GEN, "steps": 0}, 422),
             ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404)]
    for path, body, status in cases:
        r = client.post(path, json=body)
        assert r.status_code == status, r.text
        jsonschema.validate(r.json(), error_schema_of(schema, path, "post", str(status)))
    app = create_app(engine(), limits=ServeLimits(max_queue=0))
    with TestClient(app) as c:
        r = c.post("/v1/generate", json=GEN)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        jsonschema.validate(r.json(), error_schema_of(schema, "/v1/generate", "post", "429"))
        app.state.worker.stop()
        r = c.post("/v1/generate", json=GEN)
        assert r.status_code == 503
        jsonschema.validate(r.json(), error_schema_of(schema, "/v1/generate", "post", "503"))


# -- strict types ------------------------------------------------------------------------------------------------------
CHAT = {"model": "default", "messages": [{"role": "user", "content": "blue"}], "max_tokens": 3, "steps": 2,
        "max_images": 0}


@pytest.mark.parametrize("route,body", [
    ("/v1/generate", {**GEN, "stream": 0}),
    ("/v1/generate", {**GEN, "stream": "false"}),
    ("/v1/generate", {**GEN, "ignore_eos": 1}),
    ("/v1/generate", {**GEN, "max_tokens": "5"}),
    ("/v1/generate", {**GEN, "steps": True}),
    ("/v1/generate", {**GEN, "temperature": "0.5"}),
    ("/v1/generate", {**GEN, "guidance": False}),
    ("/v1/chat/completions", {**CHAT, "stream": 0}),
    ("/v1/chat/completions", {**CHAT, "seed": "7"}),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": 1}}),
])
def test_declared_types_are_strict(client, route, body):
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == 422


def test_numbers_json_clients_send_are_accepted(client):
    """An integer where a number is declared, and an integral float where an integer is (JSON Schema's own rule:
    5.0 is an integer), are what JSON clients send; both are served. A chat stop string may be longer than 8
    characters (8 is the most stop strings)."""
    r = client.post("/v1/generate", json={**GEN, "temperature": 1, "guidance": 2, "max_tokens": 4.0, "max_images": 0})
    assert r.status_code == 200, r.text
    assert client.post("/v1/generate", json={**GEN, "max_tokens": 4.5}).status_code == 422  # not truncated
    assert client.post("/v1/chat/completions", json={**CHAT, "stop": "a long stop string"}).status_code == 200


def test_schema_bounds_are_the_bounds_the_server_enforces(client, schema):
    """For every integer field with bounds, at the documented maximum and minimum the server does not answer 422, and
    one beyond either it does (the schema's numbers are exactly the server's: no bound lost or rounded)."""
    bodies = {"/v1/generate": GEN, "/v1/chat/completions": CHAT}
    checked = 0
    for path, base in bodies.items():
        request = resolved(schema, schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
                           ["schema"])
        for name, prop in request["properties"].items():
            branch = next((b for b in prop.get("anyOf", [prop]) if b.get("type") == "integer"), None)
            if branch is None or "maximum" not in branch:
                continue
            high, low = branch["maximum"], branch["minimum"]
            assert high == int(high) and low == int(low), (path, name, branch)
            for value, refused in ((int(high), False), (int(low), False), (int(high) + 1, True), (int(low) - 1, True)):
                r = client.post(path, json={**base, name: value, "max_tokens": 1, "steps": 1, "max_images": 0}
                                if name not in ("max_tokens", "steps", "max_images") else {**base, name: value})
                assert (r.status_code == 422) == refused, (path, name, value, r.status_code, r.text[:200])
            checked += 1
    assert checked >= 10
    seed = client.post("/v1/generate", json={**GEN, "seed": None, "max_images": 0}).json()["seed"]
    assert 0 <= seed <= 2**53 - 1  # a fresh seed is one every JSON client holds exactly


# -- examples ----------------------------------------------------------------------------------------------------------
def test_schema_examples_are_valid_requests_the_server_serves(schema):
    """Every example in the schema validates against its request schema, and a server with default limits answers
    it with 200 (streamed examples end with their final event)."""
    with TestClient(create_app(engine(boi_bias=50.0))) as c:
        served = 0
        for path in ("/v1/generate", "/v1/chat/completions"):
            body_schema = resolved(schema, schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
                                   ["schema"])
            examples = body_schema.get("examples", [])
            assert len(examples) >= 2, path
            for example in examples:
                jsonschema.validate(example, body_schema)
                r = c.post(path, json=example)
                assert r.status_code == 200, (path, example, r.text)
                if example.get("stream"):
                    events = sse_events(r.iter_lines())
                    assert events[-1][0] == "done" or events[-1][1] == "[DONE]"
                served += 1
    assert served >= 4


# -- seeds -------------------------------------------------------------------------------------------------------------
def image_png(body: dict) -> str:
    return next(seg["png"] for seg in body["output"] if seg["type"] == "image")


def content(body: dict) -> list[dict]:
    """What was generated, without the timings."""
    return [{k: v for k, v in seg.items() if k != "seconds"} for seg in body["output"]]


def test_unseeded_requests_draw_fresh_seeds_and_replay(client):
    image = {"segments": [{"type": "text", "text": "blue"}], "start_with_image": True, "max_tokens": 2, "steps": 3}
    a, b = (client.post("/v1/generate", json=image).json() for _ in range(2))
    assert isinstance(a["seed"], int) and isinstance(b["seed"], int) and a["seed"] != b["seed"]
    assert image_png(a) != image_png(b)  # four variations asked for are four images, not one
    again = client.post("/v1/generate", json={**image, "seed": a["seed"]}).json()
    assert again["seed"] == a["seed"] and content(again) == content(a)

    text = {"segments": [{"type": "text", "text": "a"}], "max_tokens": 24, "temperature": 2.0, "max_images": 0,
            "ignore_eos": True}
    runs = [client.post("/v1/generate", json=text).json() for _ in range(3)]
    assert len({r["seed"] for r in runs}) == 3 and len({r["output"][0]["text"] for r in runs}) > 1
    replay = client.post("/v1/generate", json={**text, "seed": runs[0]["seed"]}).json()
    assert content(replay) == content(runs[0])

    with client.stream("POST", "/v1/generate", json={**text, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    done = events[-1]
    assert done[0] == "done" and isinstance(done[1]["seed"], int)
    streamed = "".join(d["text"] for n, d in events if n == "text")
    replay = client.post("/v1/generate", json={**text, "seed": done[1]["seed"]}).json()
    assert replay["output"][0]["text"] == streamed


def test_seeded_requests_stay_deterministic(client):
    body = {"segments": [{"type": "text", "text": "blue"}], "start_with_image": True, "max_tokens": 6, "steps": 3,
            "temperature": 1.5, "seed": 12345}
    a, b = (client.post("/v1/generate", json=body).json() for _ in range(2))
    assert a["seed"] == b["seed"] == 12345 and content(a) == content(b)
    assert client.post("/v1/generate", json={**body, "seed": 0}).json()["seed"] == 0  # 0 is a seed like any other


def test_chat_returns_its_seed_and_replays(client):
    body = {**CHAT, "max_tokens": 20, "temperature": 2.0, "ignore_eos": True}
    a, b = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    assert isinstance(a["seed"], int) and a["seed"] != b["seed"]
    again = client.post("/v1/chat/completions", json={**body, "seed": a["seed"]}).json()
    assert again["choices"][0]["message"] == a["choices"][0]["message"] and again["seed"] == a["seed"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [d for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]
    seeds = {c["seed"] for c in chunks}
    assert len(seeds) == 1 and isinstance(seeds.pop(), int)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    replay = client.post("/v1/chat/completions", json={**body, "seed": chunks[0]["seed"]}).json()
    assert replay["choices"][0]["message"]["content"] == streamed


# -- the schema-driven fuzzer ------------------------------------------------------------------------------------------
def test_schema_fuzzer_finds_no_5xx_and_no_contradiction():
    """A few hundred requests generated from /openapi.json: schema-valid bodies (never answered 422), bodies with one
    value mutated (answered 422 exactly when the schema rejects them), the GET routes. Every status is one the route
    documents and every body (JSON, or each SSE event) validates against the schema documented for it. (The app:
    the fuzzer's own tiny model, 4 denoising passes by default, so that the requests that generate are quick.)"""
    fuzz = fuzz_module()
    with TestClient(fuzz.fuzz_app()) as client:
        report = fuzz.run_fuzz(client, examples=250, seed=0)
        assert client.get("/health").json()["status"] == "ok"
    assert report.requests >= 300, report
    assert report.failures == [], "\n".join(report.failures[:10])
    assert {"valid", "mutated"} <= set(report.kinds) and report.statuses.get(200, 0) >= 10, report
