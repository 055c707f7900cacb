"""SIGTERM to ``tools/serve.py`` drains: a new request gets 503 with Retry-After, the stream in flight finishes with
its done event (or, past ``--drain-timeout``, ends with a final error event), and the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    """A random-weight export of the shapes recipe at toy width (2 layers of 64): serve.py loads it in seconds."""
    import torch

    from transfusion.checkpoint.export import export_model
    from transfusion.components import build_components
    from transfusion.config import load_config, to_dict

    cfg = load_config(ROOT / "recipes" / "shapes_tiny.toml", ["model.dim=64", "model.n_layers=2", "model.n_heads=4"])
    torch.manual_seed(0)
    parts = build_components(cfg, torch.device("cpu"))
    return str(export_model(tmp_path_factory.mktemp("serve") / "export", parts.model.state_dict(), to_dict(cfg)))


@contextmanager
def serving(export: str, drain_timeout: float):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), "--export", export, "--port",
                             str(port), "--precision", "fp32", "--max-steps", "5000", "--log-level", "warning",
                             "--drain-timeout", str(drain_timeout)], cwd=ROOT, stdout=log, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            log.seek(0)
            pytest.fail(f"serve.py did not come up: {log.read()[-2000:]}")
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class Stream(threading.Thread):
    """One streamed /v1/generate on its own thread: the SSE event names in order, and when the first arrived."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[tuple[str, dict]] = []
        self.started = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=300) as c, c.stream("POST", self.url + "/v1/generate", json=self.body) as r:
                assert r.status_code == 200, r.status_code
                name = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((name, json.loads(line[6:])))
                        self.started.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.started.set()
            self.ended.set()


def new_request_during_drain(url: str, stream: Stream) -> httpx.Response:
    """POST a new request while the stream is in flight (the server is draining): polled until it is refused, at
    most 20 times, so that a SIGTERM not yet handled is waited for."""
    for _ in range(20):
        r = httpx.post(url + "/v1/generate", json={"segments": [{"type": "text", "text": "x"}], "max_tokens": 1},
                       timeout=60)
        if r.status_code == 503:
            return r
        time.sleep(0.1)
    return r


def test_sigterm_drains_in_flight_streams_refuses_new_requests_and_exits_0(export):
    long = {"segments": [{"type": "text", "text": "two green triangles"}], "stream": True, "start_with_image": True,
            "max_images": 1, "steps": 150, "max_tokens": 8, "ignore_eos": True, "seed": 1}
    with serving(export, drain_timeout=120) as (url, proc, log):
        stream = Stream(url, long)
        stream.start()
        assert stream.started.wait(120) and stream.error is None  # in flight: image_start seen
        proc.send_signal(signal.SIGTERM)
        r = new_request_during_drain(url, stream)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["code"] == 503
        health = httpx.get(url + "/health", timeout=30)
        in_flight = not stream.ended.is_set()
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert in_flight, "the stream ended before the drain was observed: make it longer"
        assert proc.wait(timeout=150) == 0  # after the stream finished, within the drain deadline
        stream.join(timeout=30)
        assert stream.error is None, stream.error
        names = [n for n, _ in stream.events]
        assert names[-1] == "done" and "image" in names, names
        assert stream.events[-1][1]["usage"]["tokens"] == 8
        log.seek(0)
        assert "draining" in log.read()


def test_sigterm_past_the_drain_deadline_ends_streams_with_an_error_event(export):
    endless = {"segments": [{"type": "text", "text": "blue"}], "stream": True, "start_with_image": True,
               "max_images": 4, "steps": 5000, "max_tokens": 8, "seed": 2}
    with serving(export, drain_timeout=1) as (url, proc, _):
        stream = Stream(url, endless)
        stream.start()
        assert stream.started.wait(120) and stream.error is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # 1 s of drain, then the stream is ended and the server exits
        stream.join(timeout=30)
        assert stream.error is None, stream.error
        name, data = stream.events[-1]
        assert name == "error" and data["code"] == 503 and "shut down" in data["error"], stream.events[-1]
        assert "done" not in [n for n, _ in stream.events]
