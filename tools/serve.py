#!/usr/bin/env python
"""Serve an exported model over HTTP: a web page, /v1/generate (SSE), OpenAI-shaped /v1/chat/completions, /metrics.

    python tools/serve.py --export runs/shapes_tiny/export                 # http://127.0.0.1:8000/
    python tools/serve.py --export runs/shapes_tiny/export --host 0.0.0.0 --port 8080 --token "$SECRET"

Binds 127.0.0.1 unless told otherwise; with --token (or TRANSFUSION_TOKEN) every /v1 route needs
"Authorization: Bearer TOKEN". See transfusion/serving/server.py for the routes and README "Serving" for curl examples.

SIGTERM (or Ctrl-C) drains: new /v1 requests get 503 with Retry-After and /health 503 "draining"; requests in flight
finish, or after --drain-timeout seconds end (a stream with a final error event, a JSON request with 503); then the
process exits 0. A second SIGTERM / Ctrl-C ends the requests in flight at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from transfusion.cli import fail_cleanly


def parse_args(argv=None) -> argparse.Namespace:
    from transfusion.config import PRECISIONS
    from transfusion.serving.protocol import ServeLimits

    d = ServeLimits()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export directory (model.safetensors + config.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("TRANSFUSION_TOKEN"),
                   help="bearer token required on /v1 routes (default: $TRANSFUSION_TOKEN, else none)")
    p.add_argument("--model-name", default=None, help="the id /v1/models lists (default: the export's folder name "
                   "above 'export', e.g. shapes_tiny); 'default' is always accepted too")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on CUDA; on CPU bf16 only where a short probe shows it faster than fp32")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests generating at once")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="largest denoising step count")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds requests in flight get to finish before they are ended (default 30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    if not args.drain_timeout >= 0:
        p.error("--drain-timeout must be >= 0")
    for name in ("port", "max_batch", "max_queue", "max_tokens", "max_steps", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    import uvicorn

    from transfusion.generation.engine import Engine
    from transfusion.serving.protocol import ServeLimits
    from transfusion.serving.server import create_app

    engine = Engine.from_export(args.export, device=args.device, precision=args.precision)
    export = Path(args.export).resolve()
    name = args.model_name or (export.parent.name if export.name == "export" else export.name)
    limits = ServeLimits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                         max_steps=args.max_steps, max_prompt_tokens=args.max_prompt_tokens,
                         max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_app(engine, model_name=name, limits=limits, token=args.token, start_worker=False)
    h, w = engine.image_size
    # HTTP on a thread, the engine on the main thread (the thread that loaded the model: torch's CPU thread pool
    # runs its kernels fastest there; see EngineWorker.start)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    drain = app.state.drain

    def on_signal(signum, frame) -> None:
        again = drain.draining
        drain.begin(0.0 if again else args.drain_timeout)
        print(f"{signal.Signals(signum).name}: " + ("ending the requests in flight now" if again else
              f"draining: new requests get 503; requests in flight get {args.drain_timeout:g} s to finish"),
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not server.started:
        print(f"error: could not serve on {args.host}:{args.port} (address in use?)", file=sys.stderr)
        return 1
    print(f"serving {name} ({export}) on http://{args.host}:{args.port}/  images {h}x{w}, "
          f"precision {engine.precision.name}, max batch {limits.max_batch}, "
          f"token {'required' if args.token else 'off'}", flush=True)
    try:  # until the drain is over: nothing in flight, or 5 s past its deadline (a client that does not read)
        app.state.worker.run(until=lambda: not http.is_alive() or drain.finished(grace=5.0))
    finally:
        server.should_exit = True
        http.join(timeout=10)
    if drain.draining:
        print("drained; exiting", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
