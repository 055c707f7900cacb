#!/usr/bin/env python
"""Benchmark the generation server: throughput and latency at several numbers of concurrent streaming clients, and
the time per image with the prefix cache reused across denoising passes vs the prefix recomputed at every pass, and
the batching ceiling of the machine (in-process images/s and the trunk's matmul GFLOP/s at each batch's rows), and
the time per image under constant and interval guidance.

    python tools/bench_serve.py --export runs/shapes_tiny/export            # starts the server in this process
    python tools/bench_serve.py --recipe recipes/shapes_tiny.toml            # the recipe's shape, random weights
    python tools/bench_serve.py --url http://127.0.0.1:8000 --clients 1 4 16 # against a running server
    python tools/bench_serve.py --soak 2000 --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4
                                                                             # 2,000 mixed requests, 16 clients
    python tools/bench_serve.py --fuzz 2000                                  # schema-driven fuzzing, in-process

Workload per client: requests one after another, alternating a text request (``--tokens`` text tokens,
``ignore_eos``) and a text -> image request (``start_with_image``, ``--steps`` passes, then 8 text tokens), all
streamed. Reported per concurrency: requests/s, tokens/s, images/s; p50 / p95 of time to first text token (text
requests), of image time (image_start -> image event, seen by the client) and of request time. The prefix table
(in-process engines only) times one guided image per prompt length, cached vs recomputed, median of ``--repeats``.
Timings name the machine they come from (CPU capability and flags); compare ratios within one run.

``--soak N``: N requests from ``--soak-clients`` (16) clients, a fixed rotation of eight kinds: streamed text,
text -> image (JSON), an interleaved prompt (text, image, text) answered with an image then text (streamed), chat
(JSON), chat with an image part (streamed, usage), captioning an uploaded image (JSON), text -> image with previews
(streamed), and a long streamed request the client closes after its first event (cancelled). Small settings (2
denoising steps, 8 tokens unless --steps / --tokens say otherwise). Reported: errors (a non-200 answer, a stream
without its final event, a transport error), p50 / p99 latency of the finished requests after warm-up (the first
10 %), the server's resident memory (VmRSS) after warm-up and at the end, and the server's counters at the end (no
request left running or queued).

``--fuzz N``: ``tools/fuzz_serve.py`` at N examples (one request each, plus some GETs) against an in-process app on a
tiny random model: prints the number of generated requests and the failures (5xx, an undocumented status, a body
the schema contradicts); exit status 1 if any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from transfusion.cli import fail_cleanly


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--export", help="export directory: serve it in this process")
    src.add_argument("--recipe", help="TOML recipe: serve a randomly initialised model of its shape "
                     "(default recipes/shapes_tiny.toml when neither --export nor --url is given)")
    src.add_argument("--url", help="a running server (then no prefix table)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends (default 4)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per image (default 20; --soak: 2)")
    p.add_argument("--tokens", type=int, default=None, help="text tokens per text request (default 32; --soak: 8)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--soak", type=int, metavar="N", help="soak test: N mixed requests (see above), then exit")
    mode.add_argument("--fuzz", type=int, metavar="N", help="schema-driven fuzzing at N examples, then exit")
    p.add_argument("--soak-clients", type=int, default=16, help="concurrent clients of --soak (default 16)")
    p.add_argument("--workload", choices=("mixed", "text", "image"), default="mixed",
                   help="mixed: text and text -> image requests alternate (default); text / image: one kind only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for --recipe (repeatable), e.g. --set model.dim=64 --set model.n_layers=2")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="prefix table: timed images per cell (median)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--token", default=None, help="bearer token of the server, if it needs one")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--skip-prefix", action="store_true", help="no prefix-reuse table")
    p.add_argument("--skip-ceiling", action="store_true",
                   help="no batching-ceiling and guidance-schedule tables (in-process images/s and trunk matmul "
                        "GFLOP/s per batch; s/image under constant vs interval guidance)")
    args = p.parse_args(argv)
    small = args.soak is not None
    args.steps = args.steps if args.steps is not None else (2 if small else 20)
    args.tokens = args.tokens if args.tokens is not None else (8 if small else 32)
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.steps < 1 or args.tokens < 1:
        p.error("--clients, --requests-per-client, --steps and --tokens must be positive")
    if (args.soak is not None and args.soak < 1) or (args.fuzz is not None and args.fuzz < 1) or args.soak_clients < 1:
        p.error("--soak, --fuzz and --soak-clients must be positive")
    if not (args.export or args.url or args.recipe):
        args.recipe = "recipes/shapes_tiny.toml"
    return args


def machine() -> str:
    import platform

    import torch

    from transfusion.precision import cpu_features

    feats = cpu_features()
    return (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPU capability "
            f"{feats['capability']} (flags: {' '.join(feats['flags']) or 'n/a'}), {feats['threads']} threads")


def build_engine(args):
    from transfusion.generation.engine import Engine

    if args.export:
        return Engine.from_export(args.export, precision=args.precision)
    import torch

    from transfusion.components import build_components
    from transfusion.config import load_config

    cfg = load_config(args.recipe, args.set)
    torch.manual_seed(0)  # the same random model every run
    parts = build_components(cfg, torch.device("cpu"))
    return Engine(parts.model, parts.tokenizer, parts.schedule, parts.codec, parts.patch_grid, torch.device("cpu"),
                  args.precision, cfg)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def one_request(client, url: str, body: dict, headers: dict) -> dict:
    t0 = time.perf_counter()
    rec = {"kind": "image" if body.get("start_with_image") else "text", "ttft": None, "image": [], "tokens": 0}
    image_started = None
    async with client.stream("POST", url + "/v1/generate", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread())[:200]!r}")
        name = None
        async for line in r.aiter_lines():
            now = time.perf_counter()
            if line.startswith("event: "):
                name = line[7:]
                if name == "image_start":
                    image_started = now
                elif name == "image" and image_started is not None:
                    rec["image"].append(now - image_started)
            elif line.startswith("data: ") and name == "text" and rec["ttft"] is None:
                rec["ttft"] = now - t0
            elif line.startswith("data: ") and name == "done":
                rec["tokens"] = json.loads(line[6:])["usage"]["tokens"]
    rec["seconds"] = time.perf_counter() - t0
    return rec


async def load(url: str, clients: int, args, headers: dict) -> dict:
    import httpx

    text = {"segments": [{"type": "text", "text": "a red circle to the left of a blue square"}], "stream": True,
            "max_tokens": args.tokens, "ignore_eos": True, "max_images": 0}
    image = {"segments": [{"type": "text", "text": "two green triangles"}], "stream": True, "start_with_image": True,
             "max_images": 1, "max_tokens": 8, "ignore_eos": True, "steps": args.steps, "guidance": args.guidance}

    async def client_loop(c, i: int) -> list[dict]:
        out = []
        for j in range(args.requests_per_client):
            kind = {"text": 0, "image": 1}.get(args.workload, (i + j) % 2)
            body = dict(image if kind else text, seed=1000 * i + j)
            out.append(await one_request(c, url, body, headers))
        return out

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        await one_request(c, url, dict(image, steps=2), headers)  # warm-up
        t0 = time.perf_counter()
        recs = [r for rs in await asyncio.gather(*(client_loop(c, i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in recs if r["kind"] == "text" and r["ttft"] is not None]
    imgs = [s for r in recs for s in r["image"]]
    reqs = [r["seconds"] for r in recs]
    return {"clients": clients, "requests": len(recs), "wall_s": wall, "requests_per_s": len(recs) / wall,
            "tokens_per_s": sum(r["tokens"] for r in recs) / wall, "images_per_s": len(imgs) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "image_p50": pct(imgs, 0.5),
            "image_p95": pct(imgs, 0.95), "request_p50": pct(reqs, 0.5), "request_p95": pct(reqs, 0.95)}


# -- soak --------------------------------------------------------------------------------------------------------
SOAK_KINDS = ("text_stream", "image_json", "interleaved_stream", "chat_json", "chat_image_stream", "caption_json",
              "image_previews_stream", "cancelled")


def soak_request(kind: str, i: int, args, image_b64: str) -> tuple[str, dict, bool]:
    """(route, body, streamed) of the i-th soak request of this ``kind``; unseeded but for every other one."""
    text = [{"type": "text", "text": ("a red circle", "two green triangles", "a blue square on the left")[i % 3]}]
    image = [{"type": "image", "image": image_b64}]
    seed = {"seed": i} if i % 2 else {}
    small = {"max_tokens": args.tokens, "steps": args.steps, "guidance": args.guidance, **seed}
    if kind == "text_stream":
        return "/v1/generate", {"segments": text, "max_images": 0, "stream": True, "temperature": 0.8, **small}, True
    if kind == "image_json":
        return "/v1/generate", {"segments": text, "start_with_image": True, **small}, False
    if kind == "interleaved_stream":
        return "/v1/generate", {"segments": text + image + text, "start_with_image": True, "stream": True,
                                "ignore_eos": True, **small}, True
    if kind == "chat_json":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text[0]["text"]}], "max_images": 0,
                                        **small}, False
    if kind == "chat_image_stream":
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}},
                 {"type": "text", "text": text[0]["text"]}]
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "start_with_image": True,
                                        "stream": True, "stream_options": {"include_usage": True}, **small}, True
    if kind == "caption_json":
        return "/v1/generate", {"segments": image, "max_images": 0, **small}, False
    if kind == "image_previews_stream":
        return "/v1/generate", {"segments": text, "start_with_image": True, "stream": True, "preview_every": 1,
                                **small}, True
    return "/v1/generate", {"segments": text, "start_with_image": True, "stream": True, "max_images": 4,
                            "steps": max(50, args.steps), "max_tokens": 64, "ignore_eos": True}, True  # cancelled


async def soak_one(client, url: str, kind: str, i: int, args, image_b64: str, headers: dict) -> dict:
    route, body, streamed = soak_request(kind, i, args, image_b64)
    rec = {"kind": kind, "error": None}
    t0 = time.perf_counter()
    try:
        if not streamed:
            r = await client.post(url + route, json=body, headers=headers)
            if r.status_code != 200:
                rec["error"] = f"{kind}: {r.status_code} {r.text[:200]}"
            elif "seed" not in r.json():
                rec["error"] = f"{kind}: no seed in the answer"
        else:
            async with client.stream("POST", url + route, json=body, headers=headers) as r:
                if r.status_code != 200:
                    rec["error"] = f"{kind}: {r.status_code} {(await r.aread())[:200]!r}"
                else:
                    last, events = None, 0
                    async for line in r.aiter_lines():
                        if line.startswith("event: "):
                            last = line[7:]
                        elif line.startswith("data: "):
                            events += 1
                            if line == "data: [DONE]":
                                last = "[DONE]"
                            if kind == "cancelled":
                                break  # leaving the block closes the connection: the server cancels the request
                    if kind != "cancelled" and last not in ("done", "[DONE]"):
                        rec["error"] = f"{kind}: the stream ended with {last!r}"
                    elif kind == "cancelled" and events == 0:
                        rec["error"] = f"{kind}: no event before the close"
    except Exception as e:  # noqa: BLE001 - counted as an error of the soak
        rec["error"] = f"{kind}: {type(e).__name__}: {e}"
    rec["seconds"] = time.perf_counter() - t0
    return rec


def resident_mb(pid: int | None) -> float | None:
    """VmRSS of a process (Linux), in MiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def soak(url: str, args, headers: dict, pid: int | None) -> dict:
    """``args.soak`` requests from ``args.soak_clients`` clients (see the module docstring)."""
    import base64
    import io

    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    image_b64 = base64.b64encode(buf.getvalue()).decode()
    n, warmup = args.soak, max(args.soak_clients, args.soak // 10)
    counter = iter(range(n))
    recs: list[dict] = []
    memory = {"start": resident_mb(pid), "warm": None, "samples": []}
    t0 = time.perf_counter()

    async def client_loop(c) -> None:
        for i in counter:  # a shared iterator: every request is sent once, by whichever client is free
            rec = await soak_one(c, url, SOAK_KINDS[i % len(SOAK_KINDS)], i, args, image_b64, headers)
            rec["index"] = i
            recs.append(rec)
            done = len(recs)
            if done == warmup:
                memory["warm"] = resident_mb(pid)
            if done % 100 == 0:
                memory["samples"].append((done, resident_mb(pid)))
                errors = sum(r["error"] is not None for r in recs)
                print(f"#   {done}/{n} requests, {errors} errors, {time.perf_counter() - t0:.0f} s, "
                      f"server RSS {fmt(resident_mb(pid), 1)} MiB", flush=True)

    limits = httpx.Limits(max_connections=args.soak_clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        await asyncio.gather(*(client_loop(c) for _ in range(args.soak_clients)))
        wall = time.perf_counter() - t0
        deadline = time.time() + 60  # the cancelled requests' slots come back
        while time.time() < deadline:
            m = await server_counters(c, url)
            if m.get("transfusion_running_requests", 0) == 0 and m.get("transfusion_queue_depth", 0) == 0:
                break
            await asyncio.sleep(0.5)
    memory["end"] = resident_mb(pid)
    after = [r for r in recs if r["index"] >= warmup and r["error"] is None and r["kind"] != "cancelled"]
    latency = [r["seconds"] for r in after]
    by_kind = {k: [r["seconds"] for r in after if r["kind"] == k] for k in SOAK_KINDS if k != "cancelled"}
    errors = [r["error"] for r in recs if r["error"] is not None]
    growth = None
    if memory["warm"] and memory["end"]:
        growth = 100 * (memory["end"] - memory["warm"]) / memory["warm"]
    return {"requests": len(recs), "clients": args.soak_clients, "warmup": warmup, "wall_s": wall,
            "errors": len(errors), "error_examples": errors[:10],
            "cancelled": sum(r["kind"] == "cancelled" for r in recs), "p50_s": pct(latency, 0.5),
            "p99_s": pct(latency, 0.99), "by_kind": {k: {"p50_s": pct(v, 0.5), "p99_s": pct(v, 0.99), "n": len(v)}
                                                    for k, v in by_kind.items()},
            "rss_start_mb": memory["start"], "rss_warm_mb": memory["warm"], "rss_end_mb": memory["end"],
            "rss_growth_pct": growth, "rss_samples": memory["samples"], "server": m, "steps": args.steps,
            "tokens": args.tokens}


async def server_counters(client, url: str) -> dict[str, float]:
    """The server's unlabelled /metrics values (gauges and counters)."""
    out = {}
    for line in (await client.get(url + "/metrics")).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def print_soak(r: dict) -> None:
    print("\n| requests | clients | errors | cancelled (closed by the client) | latency p50 / p99 (s) | server RSS "
          "after warm-up (MiB) | at the end (MiB) | growth |\n|---|---|---|---|---|---|---|---|")
    print(f"| {r['requests']} | {r['clients']} | {r['errors']} | {r['cancelled']} | {fmt(r['p50_s'])} / "
          f"{fmt(r['p99_s'])} | {fmt(r['rss_warm_mb'], 1)} | {fmt(r['rss_end_mb'], 1)} | "
          f"{fmt(r['rss_growth_pct'], 1)} % |")
    print("\n| kind | finished after warm-up | p50 (s) | p99 (s) |\n|---|---|---|---|")
    for kind, k in r["by_kind"].items():
        print(f"| {kind} | {k['n']} | {fmt(k['p50_s'])} | {fmt(k['p99_s'])} |")
    m = r["server"]
    print(f"\n# {r['wall_s']:.0f} s wall; server at the end: running {m.get('transfusion_running_requests')}, queued "
          f"{m.get('transfusion_queue_depth')}, finished {m.get('transfusion_finished_total')}, cancellations "
          f"{m.get('transfusion_cancellations_total')}, failed {m.get('transfusion_failed_total')}; RSS at start "
          f"{fmt(r['rss_start_mb'], 1)} MiB; samples (requests, MiB): "
          + ", ".join(f"({n}, {fmt(v, 0)})" for n, v in r["rss_samples"]), flush=True)
    for e in r["error_examples"]:
        print(f"# error: {e}")


def run_fuzz(args, results: dict) -> int:
    """``tools/fuzz_serve.py`` at ``args.fuzz`` examples, in-process."""
    import importlib.util

    from fastapi.testclient import TestClient

    spec = importlib.util.spec_from_file_location("fuzz_serve", Path(__file__).with_name("fuzz_serve.py"))
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_serve"] = fuzz
    spec.loader.exec_module(fuzz)
    with TestClient(fuzz.fuzz_app()) as client:
        report = fuzz.run_fuzz(client, args.fuzz, progress=True)
    print(f"\nfuzz: {report.summary()}", flush=True)
    for failure in report.failures[:10]:
        print(failure)
    results["fuzz"] = {"examples": args.fuzz, "requests": report.requests, "failures": len(report.failures),
                       "statuses": dict(report.statuses), "kinds": dict(report.kinds), "seconds": report.seconds,
                       "failure_examples": report.failures[:10]}
    return 1 if report.failures else 0


def serve_in_subprocess(export: str, max_batch: int, precision: str):
    """``tools/serve.py`` in its own process (the client's event loop must not share the server's interpreter)."""
    import socket
    import subprocess
    import tempfile

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(Path(__file__).with_name("serve.py")), "--export", export, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning", "--precision", precision,
           "--max-steps", "1000", "--max-tokens", "100000"]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read()[-500:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 180 s")


def export_random(engine, directory: str) -> str:
    from transfusion.checkpoint.export import export_model
    from transfusion.config import to_dict

    return str(export_model(Path(directory) / "export", engine.model.state_dict(), to_dict(engine.cfg)))


def prefix_table(engine, args) -> list[dict]:
    """One guided image per prompt, prefix cached vs recomputed at every pass, for prompts of growing length:
    a caption, and a conversation holding 1 and 2 earlier images with their captions."""
    import torch

    from transfusion.sequence import caption_prompt_tokens

    tok, P = engine.tok, engine.num_patches
    caption = tok.encode("a red circle to the left of a blue square")
    turn = [tok.boi_id] + [tok.image_id] * P + [tok.eoi_id] + caption
    rows = []
    for name, earlier in (("caption prompt", 0), ("1 earlier image + captions", 1), ("2 earlier images + captions", 2)):
        seq = [tok.bos_id] + caption + turn * earlier + [tok.boi_id]
        h, w = engine.image_size
        images = torch.zeros(earlier, engine.codec.channels, h // engine.codec.downsample, w // engine.codec.downsample)
        spans = [(0, 1 + len(caption) + k * len(turn) + 1) for k in range(earlier)]

        def cached():
            pre = engine.prefill([seq], images if earlier else None, spans if earlier else None)
            unc = engine.prefill([caption_prompt_tokens(tok)])
            return engine.denoise(pre, uncond=unc, guidance=args.guidance, sampler=None, steps=args.steps,
                                  generator=torch.Generator().manual_seed(0))

        def recomputed():
            return engine.denoise_recomputing([seq], guidance=args.guidance, sampler=None, steps=args.steps,
                                              generator=torch.Generator().manual_seed(0),
                                              images=images if earlier else None,
                                              image_spans=spans if earlier else None)

        times = {}
        for label, fn in (("cached", cached), ("recomputed", recomputed)):
            fn()  # warm-up
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[label] = statistics.median(ts)
        rows.append({"prompt": name, "prefix_tokens": len(seq), "image_tokens": P, "cached_s": times["cached"],
                     "recomputed_s": times["recomputed"], "speedup": times["recomputed"] / times["cached"]})
    return rows


def ceiling_table(engine, args) -> list[dict]:
    """What batching can give on this machine, without HTTP: ``b`` text -> image requests run together through the
    scheduler (images/s), and one matmul of the trunk's MLP shape at the rows a guided image pass of ``b`` requests
    runs (GFLOP/s). When one request's pass already runs the matmul near the machine's rate, more requests per pass
    cannot add throughput: the ratio of the two GFLOP/s figures bounds images/s(b) / images/s(1)."""
    import torch

    from transfusion.serving.scheduler import Scheduler, SamplingParams

    dim = engine.cfg.model.dim
    hidden2 = engine.model.layers[0].ffn.w13.out_features  # SwiGLU's two input projections in one matmul
    rows_per_request = engine.num_patches * (2 if args.guidance != 1.0 else 1)

    def images_per_s(b: int) -> float:
        sched = Scheduler(engine, max_batch=b)
        params = [SamplingParams(max_tokens=1, ignore_eos=True, start_with_image=True, max_images=1,
                                 steps=args.steps, guidance=args.guidance, guidance_schedule="constant", seed=i)
                  for i in range(b)]
        for p in params:
            sched.submit("two green triangles", p)
        t0 = time.perf_counter()
        while sched.busy():
            sched.step()
        return b / (time.perf_counter() - t0)

    def gflops(rows: int) -> float:
        x = torch.randn(rows, dim)
        w = torch.randn(dim, hidden2)
        with engine.autocast():
            for _ in range(3):
                x @ w
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                x @ w
                n += 1
        return 2 * rows * dim * hidden2 * n / (time.perf_counter() - t0) / 1e9

    images_per_s(1)  # warm-up
    out = []
    for b in args.clients:
        ips = statistics.median(images_per_s(b) for _ in range(args.repeats))
        out.append({"requests": b, "rows_per_pass": b * rows_per_request, "images_per_s": ips,
                    "matmul_gflops": gflops(b * rows_per_request)})
    for r in out:
        r["images_ratio"] = r["images_per_s"] / out[0]["images_per_s"]
        r["matmul_ratio"] = r["matmul_gflops"] / out[0]["matmul_gflops"]
    return out


def schedule_table(engine, args) -> list[dict]:
    """Seconds per image of a batch of 16 guided text -> image prompts under each guidance schedule (median of
    ``--repeats``): ``interval`` runs the unconditional rows only on the passes it guides."""
    prompts = ["two green triangles"] * 16
    rows = []
    for schedule in ("constant", "interval"):
        engine.text_to_image(prompts[:2], steps=2, guidance=args.guidance, guidance_schedule=schedule)  # warm-up
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.text_to_image(prompts, steps=args.steps, guidance=args.guidance, guidance_schedule=schedule)
            ts.append((time.perf_counter() - t0) / len(prompts))
        rows.append({"schedule": schedule, "s_per_image": statistics.median(ts)})
    for r in rows:
        r["speedup"] = rows[0]["s_per_image"] / r["s_per_image"]
    return rows


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fuzz is not None:
        print(f"# bench_serve --fuzz {args.fuzz}: tools/fuzz_serve.py in-process on a tiny random model\n"
              f"# machine: {machine()}", flush=True)
        results = {"machine": machine()}
        status = run_fuzz(args, results)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return status
    engine = None if args.url else build_engine(args)
    where = args.url or f"tools/serve.py in a subprocess ({args.export or args.recipe + ', random weights'})"
    print(f"# bench_serve: {where}\n# machine: {machine()}", flush=True)
    if engine is not None:
        print(f"# engine precision: {engine.precision.name}; image {engine.image_size}, {engine.num_patches} image "
              f"tokens; steps {args.steps}, guidance {args.guidance}", flush=True)
    results = {"machine": machine(), "source": where, "load": [], "prefix": []}
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    import subprocess
    import tempfile

    proc, tmp = None, tempfile.TemporaryDirectory()
    url = args.url
    if url is None:
        export = args.export or export_random(engine, tmp.name)
        batch = args.soak_clients if args.soak is not None else max(args.clients)
        url, proc = serve_in_subprocess(export, batch, args.precision)
    try:
        if args.soak is not None:
            print(f"# soak: {args.soak} requests from {args.soak_clients} clients, steps {args.steps}, tokens "
                  f"{args.tokens}", flush=True)
            results["soak"] = asyncio.run(soak(url, args, headers, None if proc is None else proc.pid))
            print_soak(results["soak"])
            return 0 if results["soak"]["errors"] == 0 else 1
        print("\n| clients | requests | req/s | tokens/s | images/s | TTFT p50 / p95 (s) | image p50 / p95 (s) | "
              "request p50 / p95 (s) |\n|---|---|---|---|---|---|---|---|", flush=True)
        for n in args.clients:
            r = asyncio.run(load(url, n, args, headers))
            results["load"].append(r)
            print(f"| {n} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['images_per_s']:.2f} | {fmt(r['ttft_p50'])} / {fmt(r['ttft_p95'])} | {fmt(r['image_p50'])} / "
                  f"{fmt(r['image_p95'])} | {fmt(r['request_p50'])} / {fmt(r['request_p95'])} |", flush=True)
        base = results["load"][0]["requests_per_s"]
        for r in results["load"][1:]:
            print(f"# throughput at {r['clients']} clients: {r['requests_per_s'] / base:.2f}x that at "
                  f"{results['load'][0]['clients']} (requests/s)")
    finally:
        if proc is not None:
            proc.terminate()  # SIGTERM: the server drains (nothing is in flight here) and exits 0
            try:
                code = proc.wait(timeout=60)
                results["server_exit"] = code
                if code != 0:
                    print(f"# the server exited {code} after SIGTERM", flush=True)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if engine is not None and not args.skip_prefix:
        print("\n| prompt | prefix tokens | cached s/image | recomputed s/image | reuse speed-up |\n|---|---|---|---|---|",
              flush=True)
        for row in prefix_table(engine, args):
            results["prefix"].append(row)
            print(f"| {row['prompt']} | {row['prefix_tokens']} | {row['cached_s']:.3f} | {row['recomputed_s']:.3f} | "
                  f"{row['speedup']:.2f}x |", flush=True)
    if engine is not None and not args.skip_ceiling:
        print("\n| guidance schedule (16 prompts per batch) | s/image | speed-up |\n|---|---|---|", flush=True)
        for row in schedule_table(engine, args):
            results.setdefault("schedules", []).append(row)
            print(f"| {row['schedule']} | {row['s_per_image']:.4f} | {row['speedup']:.2f}x |", flush=True)
        print(f"\n| requests per pass | rows per pass | images/s (in-process) | vs 1 | trunk matmul GFLOP/s "
              f"({engine.precision.name}) | vs 1 |\n|---|---|---|---|---|---|", flush=True)
        for row in ceiling_table(engine, args):
            results.setdefault("ceiling", []).append(row)
            print(f"| {row['requests']} | {row['rows_per_pass']} | {row['images_per_s']:.2f} | "
                  f"{row['images_ratio']:.2f}x | {row['matmul_gflops']:.1f} | {row['matmul_ratio']:.2f}x |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
