#!/usr/bin/env python
"""Schema-driven fuzzing of the generation server: requests generated from the app's own ``/openapi.json``, sent
in-process (no socket), every answer checked against the schema.

    python tools/fuzz_serve.py --examples 2000          # a tiny random-weight model; prints requests and failures

Three kinds of request per documented operation (hypothesis draws which):
- ``valid``: a body generated from the request schema (``from_json_schema``), or with its numeric bounds narrowed to
  small values so that many pass the server's limits and really generate, or one of the schema's examples. A body the
  schema accepts must not be answered 422.
- ``mutated``: a valid body with one value replaced (by a value of any JSON type, NaN included), one key dropped, or
  one unknown key added. It must be answered 422 exactly when the schema rejects it (strict types: the schema and the
  server agree on what is a boolean and what is an integer).
- the GET routes (``/health``, ``/v1/models``).

Every answer: no 5xx; a status the route documents; a content type documented for that status; a JSON body that
validates against the documented schema, or SSE whose every event validates against the schema its name has in
``x-sse-events`` and whose last event is final (``done`` / ``error`` / ``[DONE]``); the headers the status documents
(Retry-After). ``tests/test_server_contract.py`` runs this at a small budget; ``tools/bench_serve.py --fuzz N`` at a
large one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FINAL_EVENTS = ("done", "error")


@dataclass
class Report:
    requests: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)  # valid / mutated / get
    statuses: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.kinds.items()))
        return (f"{self.requests} generated requests in {self.seconds:.0f} s ({kinds}); statuses {statuses}; "
                f"{len(self.failures)} failures")


@dataclass
class Operation:
    path: str
    method: str
    body: dict | None  # the request body's schema, refs inlined
    responses: dict  # status -> {"content": {media: {...}}, "headers": {...}}, refs inlined


def inline_refs(node: Any, root: dict, seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every local ``$ref`` replaced by what it points to (the server's models are not recursive)."""
    if isinstance(node, list):
        return [inline_refs(x, root, seen) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = node["$ref"]
        if target in seen:
            raise ValueError(f"recursive schema at {target}")
        resolved: Any = root
        for part in target.lstrip("#/").split("/"):
            resolved = resolved[part]
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return inline_refs({**resolved, **rest}, root, seen + (target,))
    return {k: inline_refs(v, root, seen) for k, v in node.items() if k != "discriminator"}


def operations(schema: dict) -> list[Operation]:
    out = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            out.append(Operation(path, method, None if body is None else inline_refs(body, schema),
                                 inline_refs(op["responses"], schema)))
    return out


def narrowed(schema: Any) -> Any:
    """The schema with every numeric range cut to its first few values (max_tokens 1..4, steps 1..4, guidance
    0..3, ...): bodies drawn from it mostly pass the server's limits and run the engine briefly."""
    if isinstance(schema, list):
        return [narrowed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: narrowed(v) for k, v in schema.items()}
    if out.get("type") in ("integer", "number"):
        low = out.get("minimum", out.get("exclusiveMinimum", 0))
        out["maximum"] = min(out.get("maximum", low + 3), low + 3)
    if out.get("type") == "string" and "maxLength" in out:
        out["maxLength"] = min(out["maxLength"], 40)
    if out.get("type") == "array":
        out["maxItems"] = min(out.get("maxItems", 3), 3)
    out.pop("examples", None)
    return out


def from_json_schema(schema: dict):
    """A hypothesis strategy for the JSON Schema subset the server's request models use (const / enum, anyOf /
    oneOf of disjoint branches, null, boolean, integer and number with bounds, string lengths, arrays, objects with
    required keys and no others). Sizes are kept small; what it draws is checked with ``jsonschema`` anyway."""
    from hypothesis import strategies as st

    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        return st.one_of([from_json_schema(b) for b in branches])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        ints = st.integers(None if low is None else math.floor(low) + ("exclusiveMinimum" in schema),
                           None if high is None else math.ceil(high) - ("exclusiveMaximum" in schema))
        if kind == "integer":
            return ints
        floats = st.floats(low, high, allow_nan=False, allow_infinity=False,
                           exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema)
        return st.one_of(floats, ints.filter(lambda v: (low is None or v >= low) and (high is None or v <= high)))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 64), 64))
    if kind == "array":
        items = from_json_schema(schema.get("items", {}))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({k: from_json_schema(v) for k, v in props.items() if k in required},
                                     optional={k: from_json_schema(v) for k, v in props.items() if k not in required})
    return st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))  # anything


def is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except ValueError:
        return False


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """(event name, data) per event; data parsed as JSON except the sentinel [DONE]."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        raw = "\n".join(data)
        events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


def check(op: Operation, response, body_valid: bool | None) -> list[str]:
    """What in this answer contradicts the schema (an empty list: nothing)."""
    import jsonschema

    status, where = response.status_code, f"{op.method.upper()} {op.path} -> {response.status_code}"
    problems = []
    if status >= 500:
        problems.append(f"{where}: a 5xx ({response.text[:200]})")
    if body_valid is True and status == 422:
        problems.append(f"{where}: a schema-valid body refused ({response.text[:300]})")
    if body_valid is False and status not in (413, 422):
        problems.append(f"{where}: a body the schema rejects was not answered 422")
    documented = op.responses.get(str(status))
    if documented is None:
        return problems + [f"{where}: status not documented (documented: {sorted(op.responses)})"]
    for name, header in documented.get("headers", {}).items():
        if name.lower() == "retry-after" and status == 429 and name not in response.headers:
            problems.append(f"{where}: no {name} header")
    media = response.headers.get("content-type", "").split(";")[0].strip()
    content = documented.get("content", {})
    if media not in content:
        return problems + [f"{where}: content type {media!r} not documented ({sorted(content)})"]
    try:
        if media == "text/event-stream":
            catalogue = content[media].get("x-sse-events", {})
            events = parse_sse(response.text)
            if not events:
                problems.append(f"{where}: an empty stream")
            for name, data in events:
                if name not in catalogue:
                    problems.append(f"{where}: undocumented SSE event {name!r}")
                    continue
                jsonschema.validate(data, catalogue[name])
            if events and events[-1][0] not in FINAL_EVENTS and events[-1][1] != "[DONE]":
                problems.append(f"{where}: the stream's last event {events[-1][0]!r} is not final")
        else:
            jsonschema.validate(response.json(), content[media]["schema"])
    except (ValueError, jsonschema.ValidationError) as e:
        problems.append(f"{where}: body contradicts the schema: {str(e).splitlines()[0][:300]}")
    return problems


def run_fuzz(client, examples: int, seed: int = 0, progress: bool = False) -> Report:
    """``examples`` hypothesis examples against ``client`` (a ``fastapi.testclient.TestClient`` of the app), one
    request each (two where a GET route rides along); failures are collected, not raised, so that the count is
    complete."""
    import jsonschema
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    schema = client.get("/openapi.json").json()
    ops = operations(schema)
    posts = [op for op in ops if op.body is not None]
    gets = [op for op in ops if op.method == "get" and op.body is None]
    validators = {op.path: jsonschema.Draft202012Validator(op.body) for op in posts}
    bodies = {op.path: st.one_of(from_json_schema(op.body), from_json_schema(narrowed(op.body)),
                                 st.sampled_from(op.body.get("examples") or [{}])) for op in posts}
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(),
                        st.text(max_size=12), st.sampled_from(["true", "false", "1", "0", "1.5", "", "null"]),
                        st.sampled_from([0, 1, 1.0, 5.0, 0.5, -1, 2**53, 2**63, float("nan"), float("inf")]))
    values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars,
                                                                                max_size=3))
    report = Report()
    started = time.perf_counter()

    def locations(node, path=()):
        yield path
        if isinstance(node, dict):
            for k, v in node.items():
                yield from locations(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from locations(v, path + (i,))

    def mutate(data, body):
        body = copy.deepcopy(body)
        where = data.draw(st.sampled_from(list(locations(body))))
        op = data.draw(st.sampled_from(("replace", "drop", "add")))
        if not where:
            return data.draw(values) if op == "replace" else {**body, data.draw(st.text(max_size=8)): 1}
        parent = body
        for part in where[:-1]:
            parent = parent[part]
        if op == "replace":
            parent[where[-1]] = data.draw(values)
        elif op == "drop":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(values)
        else:
            parent.append(data.draw(values))
        return body

    def send(op: Operation, kind: str, body=None):
        if body is None:
            response = client.request(op.method.upper(), op.path)
            body_valid = None
        else:
            ok = is_json(body)
            content = json.dumps(body, allow_nan=True).encode()
            body_valid = ok and validators[op.path].is_valid(body)
            response = client.request(op.method.upper(), op.path, content=content,
                                      headers={"content-type": "application/json"})
        report.requests += 1
        report.kinds[kind] += 1
        report.statuses[response.status_code] += 1
        for problem in check(op, response, body_valid):
            report.failures.append(f"{problem}\n    body: {json.dumps(body, allow_nan=True)[:400]}")
        if progress and report.requests % 250 == 0:
            print(f"  {report.requests} requests, {len(report.failures)} failures, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(st.data())
    def one(data):
        op = data.draw(st.sampled_from(posts))
        body = data.draw(bodies[op.path])
        if data.draw(st.booleans()):
            send(op, "valid", body)
        else:
            send(op, "mutated", mutate(data, body))
        if gets and data.draw(st.integers(0, 9)) == 0:
            send(data.draw(st.sampled_from(gets)), "get")

    one()
    report.seconds = time.perf_counter() - started
    return report


def tiny_engine(seed: int = 0, steps: int = 4):
    """A tiny random-weight engine (byte tokenizer, 8x8 pixel images, 2 layers of width 64) whose default image has
    ``steps`` passes: fast enough for thousands of requests on a CPU."""
    import torch

    from transfusion.config import Config, DiffusionConfig, ModelConfig
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.generation.engine import Engine
    from transfusion.latents.vae import PixelCodec
    from transfusion.model import build_model
    from transfusion.tokenizer import ByteTokenizer

    torch.manual_seed(seed)
    tok = ByteTokenizer()
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, patch_size=4), tok.vocab_size, 3).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.image_head.image_out.proj.weight, std=0.02)
        model.lm_head.weight[tok.boi_id] += 10.0 * model.norm.weight.sign()  # images come often
    cfg = Config()  # read for its sampling defaults only (the server's default steps and guidance)
    cfg.sample.steps = steps
    return Engine(model, tok, NoiseSchedule(DiffusionConfig()), PixelCodec(), (2, 2), torch.device("cpu"),
                  precision="fp32", cfg=cfg)


def fuzz_app():
    from transfusion.serving.protocol import ServeLimits
    from transfusion.serving.server import create_app

    return create_app(tiny_engine(), model_name="tiny", limits=ServeLimits(max_steps=8, max_tokens=32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2000, help="hypothesis examples (about one request each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=10, help="failures printed in full")
    args = p.parse_args(argv)
    from fastapi.testclient import TestClient

    with TestClient(fuzz_app()) as client:
        report = run_fuzz(client, args.examples, args.seed, progress=True)
    print(f"fuzz: {report.summary()}")
    for failure in report.failures[:args.show]:
        print(failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
