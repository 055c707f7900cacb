"""The HTTP server on a tiny model: both endpoints streamed and not, limits as 4xx, a fuzz run of hostile requests,
16 concurrent streams with 8 killed mid-way (their slots come back), the bearer token, the CLI, bounded metric labels,
bench_serve's soak and fuzz modes. (The schema contract: test_server_contract.py; SIGTERM: test_server_shutdown.py.)"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_serving import engine  # noqa: E402

from transfusion.serving.protocol import BadRequest, ServeLimits, decode_image, to_pixels  # noqa: E402
from transfusion.serving.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def png_b64(w: int = 8, h: int = 8, mode: str = "RGB", fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new(mode, (w, h), (90, 90, 90) if mode == "RGB" else 1).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def sse_events(lines) -> list[tuple[str, dict | str]]:
    out, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            out.append((name, data if data == "[DONE]" else json.loads(data)))
            name = "message"
    return out


@pytest.fixture(scope="module")
def app():
    return create_app(engine(boi_bias=50.0), model_name="tiny", limits=ServeLimits(max_steps=20, max_tokens=64))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


GEN = {"segments": [{"type": "text", "text": "blue"}], "max_tokens": 6, "steps": 3, "seed": 1}


def test_generate_json_and_stream_agree(client):
    whole = client.post("/v1/generate", json=GEN)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    kinds = [seg["type"] for seg in body["output"]]
    assert "image" in kinds and "text" in kinds and body["usage"]["images"] == 1
    image = next(seg for seg in body["output"] if seg["type"] == "image")
    assert Image.open(io.BytesIO(base64.b64decode(image["png"]))).size == (8, 8)
    with client.stream("POST", "/v1/generate", json={**GEN, "stream": True, "preview_every": 1}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    names = [n for n, _ in events]
    assert names[-1] == "done" and names.count("image") == 1 and names.count("preview") == 2  # passes 1, 2 of 3
    assert names.index("image_start") < names.index("preview") < names.index("image")
    streamed_text = "".join(d["text"] for n, d in events if n == "text")
    assert streamed_text == "".join(seg["text"] for seg in body["output"] if seg["type"] == "text")
    assert next(d for n, d in events if n == "image")["png"] == image["png"]  # same seed, same image


def test_chat_completions_openai_shape(client):
    msg = {"role": "user", "content": [{"type": "text", "text": "blue"},
                                       {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}}]}
    r = client.post("/v1/chat/completions", json={"model": "default", "messages": [msg], "max_tokens": 5,
                                                  "steps": 2, "max_images": 0})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["model"] == "tiny"
    choice = j["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and j["usage"]["completion_tokens"] <= 5
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "blue"}],
                                                  "max_tokens": 5, "steps": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = sse_events(r.iter_lines())
    assert events[-1] == ("message", "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    image_parts = [p for c in chunks if c["choices"] for p in (c["choices"][0]["delta"].get("content") or [])
                   if isinstance(p, dict)]
    assert image_parts and image_parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert chunks[-1]["usage"]["images"] == 1
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["image_size"] == [8, 8]
    assert client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [msg]}).status_code == 404


@pytest.mark.parametrize("body,status", [
    ({**GEN, "steps": 21}, 400),  # above the server's limit
    ({**GEN, "steps": 0}, 422),
    ({**GEN, "max_tokens": 65}, 400),
    ({**GEN, "guidance": -1}, 422),
    ({**GEN, "sampler": "euler"}, 400),  # a flow sampler for this epsilon model
    ({**GEN, "unknown": 1}, 422),
    ({**GEN, "segments": []}, 422),
    ({**GEN, "segments": [{"type": "image", "image": "not base64!"}]}, 400),
    ({**GEN, "segments": [{"type": "image", "image": png_b64(fmt="GIF")}]}, 400),
    ({**GEN, "segments": [{"type": "image", "image": png_b64(5000, 5000, "1")}]}, 413),  # refused from its header
    ({**GEN, "segments": [{"type": "text", "text": "x" * 9000}]}, 400),
    ({**GEN, "segments": [{"type": "image", "image": png_b64()}] * 5}, 400),
    ({**GEN, "seed": -1}, 422),
    ({**GEN, "temperature": "hot"}, 422),
])
def test_limits_answer_4xx(client, body, status):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert r.status_code == 422 or "message" in r.json()["error"]


def test_body_limit_bad_json_and_queue_full():
    app = create_app(engine(), limits=ServeLimits(max_body_bytes=2000, max_queue=0))
    with TestClient(app) as c:
        assert c.post("/v1/generate", content=b"{" * 3000, headers={"content-type": "application/json"}
                      ).status_code == 413
        assert c.post("/v1/generate", content=b'{"segments": [', headers={"content-type": "application/json"}
                      ).status_code == 422
        r = c.post("/v1/generate", json=GEN)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_bearer_token():
    app = create_app(engine(), token="s3cret")
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # health and the page stay open
        assert c.get("/").status_code == 200


def test_decode_image_refuses_hostile_input():
    limits = ServeLimits()
    x = to_pixels(decode_image("data:image/png;base64," + png_b64(16, 12), (8, 8), limits))
    assert x.shape == (3, 8, 8) and abs(float(x.mean()) - (90 / 127.5 - 1)) < 0.02
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")  # ~100 kB on disk, 900 Mpx decoded
    with pytest.raises(BadRequest, match="outside"):
        decode_image(base64.b64encode(bomb.getvalue()).decode(), (8, 8), limits)
    for bad in ("", "@@@@", base64.b64encode(b"GIF89a" + b"\0" * 20).decode(), "data:text/plain;base64,aGk=",
                base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).decode()):
        with pytest.raises(BadRequest):
            decode_image(bad, (8, 8), limits)


def test_fuzz_hostile_requests_get_4xx_and_the_server_keeps_serving(client):
    """>= 500 malformed or hostile requests (hypothesis): random JSON, random bytes, every field of a valid request
    replaced by a wrong value, bad images. Every answer is 4xx; a valid request is served after every burst."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                               lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                               max_leaves=12)
    wrong = st.one_of(json_values, st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=300),
                      st.just(float("nan")), st.just(1e308), st.just([]), st.just({}))
    fields = sorted(set(GEN) | {"max_images", "guidance", "sampler", "temperature", "top_p", "top_k", "stop",
                                "preview_every", "stream", "guidance_schedule"})
    images = st.sampled_from([png_b64(5000, 5000, "1"), "!!", png_b64(fmt="GIF"), "data:image/png;base64,AAAA",
                              base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64).decode()])
    seen = {"n": 0}

    def post(content: bytes | None = None, body=None, route: str = "/v1/generate"):
        if body is not None:
            content = json.dumps(body, allow_nan=True).encode()
        r = client.post(route, content=content, headers={"content-type": "application/json"})
        seen["n"] += 1
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200], content[:200])

    cfg = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))

    @cfg
    @given(json_values.filter(lambda v: not isinstance(v, dict) or not {"segments"} <= set(v)))
    def random_json(v):
        post(body=v)

    @cfg
    @given(st.binary(max_size=200))
    def random_bytes(b):
        try:
            ok = isinstance(json.loads(b), dict) and "segments" in json.loads(b)
        except ValueError:
            ok = False
        if not ok:
            post(content=b)

    @cfg
    @given(st.sampled_from(fields), wrong)
    def wrong_field(field, value):
        body = {**GEN, field: value}
        try:  # skip the rare draw that happens to be valid
            from transfusion.serving.protocol import GenerateRequest
            req = GenerateRequest.model_validate_json(json.dumps(body))
            if (req.steps or 0) <= 20 and req.max_tokens <= 64 and req.max_images <= 4 and (req.guidance or 0) <= 20 \
                    and req.sampler in (None, "ddim", "ddpm"):
                return
        except Exception:
            pass
        post(body=body)

    @cfg
    @given(images, st.integers(min_value=1, max_value=3))
    def bad_images(image, copies):
        post(body={**GEN, "segments": [{"type": "image", "image": image}] * copies})

    chat = {"model": "default", "messages": [{"role": "user", "content": "blue"}], "max_tokens": 4, "steps": 2}

    @cfg
    @given(st.sampled_from(["model", "messages", "max_tokens", "n", "stop", "seed", "steps", "temperature",
                            "stream_options", "logit_bias", "tools"]), wrong)
    def chat_wrong_field(field, value):
        from transfusion.serving.protocol import ChatRequest

        body = {**chat, field: value}
        try:  # skip the draw that happens to be valid
            req = ChatRequest.model_validate_json(json.dumps(body))
            o = req.options()
            if req.model in ("default", "tiny") and o.max_tokens <= 64 and (o.steps or 0) <= 20:
                return
        except Exception:
            pass
        post(body=body, route="/v1/chat/completions")

    for burst in (random_json, random_bytes, wrong_field, bad_images, chat_wrong_field):
        burst()
        r = client.post("/v1/generate", json=GEN)
        assert r.status_code == 200 and r.json()["usage"]["images"] == 1
    print(f"fuzz: {seen['n']} hostile requests")
    assert seen["n"] >= 500, seen
    assert client.get("/health").json()["status"] == "ok"


# -- a real server: concurrent streams and disconnects ------------------------------------------------------------------
@contextmanager
def running_server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_16_streams_complete_and_killed_streams_free_their_slots():
    app = create_app(engine(boi_bias=50.0), limits=ServeLimits(max_batch=16, max_steps=250))
    long = {"segments": [{"type": "text", "text": "blue"}], "max_tokens": 40, "steps": 30, "stream": True,
            "max_images": 2}
    with running_server(app) as base:
        results: dict[int, list] = {}

        def client(i: int, kill_after: int | None):
            events = []
            body = {**long, "seed": i}
            if kill_after is not None:  # long enough that it cannot finish before it is killed
                body.update(steps=250, max_images=4, max_tokens=64)
            with httpx.Client(timeout=120) as c, c.stream("POST", base + "/v1/generate", json=body) as r:
                assert r.status_code == 200
                name = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                        events.append(name)
                        if kill_after is not None and len(events) >= kill_after:
                            break  # leaving the block closes the connection mid-stream
            results[i] = events

        threads = [threading.Thread(target=client, args=(i, 2 if i % 2 else None)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 16
        finished = [e for i, e in results.items() if i % 2 == 0]
        assert all(e[-1] == "done" and "image" in e for e in finished)
        deadline = time.time() + 30  # the killed streams' slots come back
        while time.time() < deadline and (metric(base, "transfusion_running_requests") > 0
                                          or metric(base, "transfusion_queue_depth") > 0):
            time.sleep(0.1)
        assert metric(base, "transfusion_running_requests") == 0 and metric(base, "transfusion_queue_depth") == 0
        assert metric(base, "transfusion_cancellations_total") == 8
        assert metric(base, "transfusion_finished_total") == 8
        assert metric(base, "transfusion_peak_batch") >= 8  # they ran together, not one by one
        assert app.state.worker.scheduler.requests == {}  # nothing left behind
        r = httpx.post(base + "/v1/generate", json={**long, "stream": False, "max_tokens": 4, "steps": 2}, timeout=60)
        assert r.status_code == 200


def test_serve_cli_help_and_bad_export(tmp_path):
    out = subprocess.run([sys.executable, "tools/serve.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--export" in out.stdout and "127.0.0.1" in out.stdout
    out = subprocess.run([sys.executable, "tools/serve.py", "--export", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_prompt_images_through_http_match_the_engine():
    """An uploaded image is read like the captioning layout: same text as Engine.caption on the decoded pixels."""
    eng = engine()
    b64 = png_b64(8, 8)
    pixels = to_pixels(decode_image(b64, eng.image_size, ServeLimits()))
    with TestClient(create_app(eng)) as client:
        r = client.post("/v1/generate", json={"segments": [{"type": "image", "image": b64}], "max_tokens": 8,
                                              "max_images": 0})
    assert r.status_code == 200
    text = "".join(s["text"] for s in r.json()["output"] if s["type"] == "text")
    assert text == eng.caption(pixels[None], max_tokens=8)[0]


def test_bench_serve_runs_at_toy_size(tmp_path):
    """tools/bench_serve.py end to end: a random-weight tiny recipe served by tools/serve.py in a subprocess, two
    concurrency levels, the prefix-reuse table. (Speed is reported by the tool, not asserted here.)"""
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "tools/bench_serve.py", "--recipe", "recipes/shapes_tiny.toml", "--clients",
                          "1", "2", "--requests-per-client", "2", "--steps", "2", "--tokens", "4", "--repeats", "1",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["clients"] for r in data["load"]] == [1, 2] and all(r["requests"] == 2 * r["clients"]
                                                                  for r in data["load"])
    assert all(r["images_per_s"] > 0 and r["tokens_per_s"] > 0 for r in data["load"])
    assert [r["prefix_tokens"] for r in data["prefix"]] == sorted(r["prefix_tokens"] for r in data["prefix"])
    ceiling = data["ceiling"]  # in-process images/s and matmul rate at each batch's rows (64 image tokens, guided)
    assert [(r["requests"], r["rows_per_pass"]) for r in ceiling] == [(1, 128), (2, 256)]
    assert all(r["images_per_s"] > 0 and r["matmul_gflops"] > 0 for r in ceiling)
    assert [r["schedule"] for r in data["schedules"]] == ["constant", "interval"]
    assert all(r["s_per_image"] > 0 for r in data["schedules"])
    assert "CPU capability" in res.stdout and "| clients |" in res.stdout and "| requests per pass |" in res.stdout


def test_review_regressions(client):
    """Long chat messages, chunked oversized bodies, special tokens typed as text, a dead engine, the rate window."""
    from transfusion.serving.worker import Window

    long = {"model": "default", "messages": [{"role": "user", "content": "blue " * 200}], "max_tokens": 3,
            "steps": 2, "max_images": 0}
    assert client.post("/v1/chat/completions", json=long).status_code == 200  # > 256 characters of content
    assert client.post("/v1/generate", json={**GEN, "temperature": 1e-38}).status_code == 200
    app = create_app(engine(), limits=ServeLimits(max_body_bytes=1000))
    with TestClient(app) as c:
        def chunks():
            for _ in range(20):
                yield b" " * 100
        r = c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413  # no Content-Length: counted while read
        app.state.worker.stop()
        assert c.get("/health").status_code == 503
        assert c.post("/v1/generate", json=GEN).status_code == 503  # not a hang
    w = Window(seconds=1.0)
    for t in range(100):
        w.add(1 if t % 2 else 0, t * 0.1)
    assert len(w.stamps) <= 10 and abs(w.rate(9.95) - 5.0) < 1e-9


def test_special_token_text_is_not_a_control_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from transfusion.tokenizer import HF_SPECIAL_TOKENS, HFTokenizer

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(list(HF_SPECIAL_TOKENS.values()))
    tok.save(str(tmp_path / "t.json"))
    hf = HFTokenizer(tmp_path / "t.json")
    ids = hf.encode("a <|boi|> b <|image|>")
    assert hf.boi_id not in ids and hf.image_id not in ids and len(ids) > 4


def test_metrics_route_labels_stay_a_bounded_set(client):
    """Requests to made-up /v1 paths are counted under "other", never one label per path (memory that grows with
    every distinct URL a client sends)."""
    for i in range(30):
        assert client.get(f"/v1/made-up-{i}").status_code == 404
    text = client.get("/metrics").text
    assert "made-up" not in text
    assert 'route="other",status="404"' in text


def test_bench_serve_soak_and_fuzz_modes_at_toy_size(tmp_path):
    """--soak: mixed requests (some cancelled) against tools/serve.py in a subprocess, which then exits 0 on SIGTERM;
    --fuzz: the schema-driven fuzzer in-process. (Numbers are the tool's to report, not asserted here.)"""
    out = tmp_path / "soak.json"
    tiny = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2"]
    res = subprocess.run([sys.executable, "tools/bench_serve.py", "--soak", "24", "--soak-clients", "4", *tiny,
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    soak = json.loads(out.read_text())
    assert soak["server_exit"] == 0
    s = soak["soak"]
    assert s["requests"] == 24 and s["errors"] == 0 and s["cancelled"] == 3 and s["clients"] == 4
    assert s["rss_warm_mb"] > 0 and s["rss_end_mb"] > 0 and s["p99_s"] >= s["p50_s"] > 0
    assert s["server"]["transfusion_running_requests"] == 0 and s["server"]["transfusion_queue_depth"] == 0
    assert "| requests | clients | errors |" in res.stdout
    out = tmp_path / "fuzz.json"
    res = subprocess.run([sys.executable, "tools/bench_serve.py", "--fuzz", "30", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fuzz = json.loads(out.read_text())["fuzz"]
    assert fuzz["requests"] >= 30 and fuzz["failures"] == 0
    assert "generated requests" in res.stdout
