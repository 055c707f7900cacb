"""The engine thread: one thread owns the scheduler and steps it while there is work; HTTP handlers (asyncio) submit
and cancel through a lock and receive their events on an asyncio queue. Torch releases the GIL inside its kernels,
so the event loop keeps answering (health, metrics, new requests) while a step runs.

    worker = EngineWorker(Scheduler(engine, max_batch=16), max_queue=64); worker.start()
    handle = worker.submit(segments, params, loop)      # raises QueueFull when max_queue requests already wait
    async for event in handle: ...                       # Event(kind="text" | "image_start" | "preview" | ...)
    worker.cancel(handle)                                 # frees its slot at the next engine step

A request still open when the engine stops gets a final ``shutdown`` event (its client is told, never left waiting).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from transfusion.serving.protocol import to_pixels, to_rgb
from transfusion.serving.scheduler import Event, SamplingParams, Scheduler, Segment, TemplatedPrompt

END = ("done", "cancelled", "failed", "shutdown")


class QueueFull(RuntimeError):
    pass


@dataclass
class Handle:
    request_id: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    finished: bool = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event.kind in END:
            self.finished = True
        return event


@dataclass
class Window:
    """Events per second over the last ``seconds`` (written by the engine thread, read by /metrics)."""

    seconds: float = 10.0
    stamps: deque = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _prune(self, now: float) -> None:
        while self.stamps and self.stamps[0][0] < now - self.seconds:
            self.stamps.popleft()

    def add(self, n: int, now: float) -> None:
        with self.lock:
            self._prune(now)
            if n:
                self.stamps.append((now, n))

    def rate(self, now: float) -> float:
        with self.lock:
            self._prune(now)
            return sum(n for _, n in self.stamps) / self.seconds


class EngineWorker:
    """Owns the scheduler on its own thread. Submissions and cancellations are commands queued for the engine thread,
    applied between steps, so an HTTP handler never waits for a step to finish (a lock held across steps starves
    the event loop: measured, time to first token rose from 0.03 s to 1.3 s at 4 clients)."""

    def __init__(self, scheduler: Scheduler, max_queue: int = 64) -> None:
        self.scheduler, self.max_queue = scheduler, max_queue
        self._work = threading.Condition()
        self._commands: deque = deque()  # ("submit", handle, prompt, params) | ("cancel", handle)
        self._handles: dict[int, Handle] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        self._load = {"queued": 0, "running": 0}  # written by the engine thread after every step
        self.tokens_window, self.images_window = Window(), Window()
        self.error: str | None = None  # set if the engine thread died
        self._counted = (0, 0)  # tokens, images already added to the windows
        self._running = False
        self._until = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine on a new thread (tests, embedding). ``tools/serve.py`` calls ``run`` on the main thread
        instead: torch's OpenMP pool is fastest for the thread that used it first, which is the thread that loaded
        the model (measured: a 20-pass image 205 ms on the main thread, 420 ms on a second thread)."""
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()

    def run(self, until=None) -> None:
        """Run the engine on the calling thread until ``stop()``, or until ``until()`` returns True (asked before
        every step, and every 0.5 s while idle)."""
        self._running, self._until = True, until
        try:
            self._run()
        finally:
            self._running = False

    def stop(self) -> None:
        with self._work:
            self._stop = True
            self._work.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._running and (self._thread is None or self._thread.is_alive())

    # -- requests (any thread) ---------------------------------------------------------------------------------------
    def submit(self, prompt: list[Segment | np.ndarray] | TemplatedPrompt, params: SamplingParams,
               loop: asyncio.AbstractEventLoop) -> Handle:
        """``prompt``: text and images (pixel tensors, or uint8 [H, W, 3] arrays, converted on the engine thread), or
        the ids of a chat template."""
        with self._work:
            waiting = self._load["queued"] + sum(c[0] == "submit" for c in self._commands)
            if waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            handle = Handle(-1, asyncio.Queue(), loop)  # its id is the scheduler's, set when submitted
            self._commands.append(("submit", handle, prompt, params))
            self._work.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        with self._work:
            if not handle.finished:
                self._commands.append(("cancel", handle))
                self._work.notify()

    def load(self) -> dict[str, int]:
        return dict(self._load)

    # -- the engine thread -------------------------------------------------------------------------------------------
    def _apply(self, commands: list) -> None:
        for command in commands:
            if command[0] == "submit":
                _, handle, prompt, params = command
                if isinstance(prompt, list):
                    prompt = [to_pixels(seg) if isinstance(seg, np.ndarray) else seg for seg in prompt]
                handle.request_id = self.scheduler.submit(prompt, params)
                self._handles[handle.request_id] = handle
            elif command[1].request_id in self._handles:
                self.scheduler.cancel(command[1].request_id)

    def _run(self) -> None:
        try:
            with self.scheduler.engine.autocast():  # held open: bf16 weight casts are made once (Engine.autocast)
                self._loop()
        except Exception as e:  # the engine is broken: fail every open request rather than hang its client
            self.error = f"{type(e).__name__}: {e}"
            for rid in list(self._handles):
                self._deliver([Event(rid, "failed", f"engine error: {self.error}")])
            raise
        for rid in list(self._handles):  # stopped with requests open: end them rather than hang their clients
            self.scheduler.cancel(rid)
            self._deliver([Event(rid, "shutdown", "the server stopped before this request finished")])

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stop and not self._commands and not self.scheduler.busy():
                    self._work.wait(timeout=0.5)
                    if self._until is not None and self._until():
                        self._stop = True
                if self._until is not None and not self._stop and self._until():
                    self._stop = True
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            self._apply(commands)
            if self.scheduler.busy():
                self._deliver(self.scheduler.step())
            sched = self.scheduler
            self._load = {"queued": sched.queued(), "running": len(sched.running())}

    def _deliver(self, events: list[Event]) -> None:
        now, stats = time.perf_counter(), self.scheduler.stats
        self.tokens_window.add(stats.tokens - self._counted[0], now)
        self.images_window.add(stats.images - self._counted[1], now)
        self._counted = (stats.tokens, stats.images)
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue
            if event.kind in ("image", "preview"):  # uint8 here, so that the HTTP side never runs torch
                event.data = {**event.data, "image": to_rgb(event.data["image"])}
            try:
                handle.loop.call_soon_threadsafe(handle.queue.put_nowait, event)
            except RuntimeError:  # its event loop is gone: nobody is listening
                self.scheduler.cancel(event.request_id)
            if event.kind in END:
                del self._handles[event.request_id]
                self.scheduler.forget(event.request_id)
