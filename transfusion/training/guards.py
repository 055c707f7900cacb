"""Run guards: stop cleanly on a preemption signal, skip non-finite steps, and the exit codes that report both.

Exit codes of ``python -m transfusion.train`` (of each rank's process under torchrun)::

    0    done: train.steps reached (or train.max_minutes spent, or a finite data stream ended); outputs written
    75   PREEMPTED_EXIT_CODE (EX_TEMPFAIL): a signal of train.preempt_signals arrived; every rank finished its step and
         one checkpoint of that step was saved; run again with --resume to continue (bitwise as if never stopped)
    3    NONFINITE_EXIT_CODE: more than train.max_bad_steps steps in a row had a non-finite loss or gradient norm;
         nothing was saved after the last checkpoint, whose weights are untouched by the skipped steps
    2    bad input (recipe, checkpoint, data): one ``error:`` line (transfusion/cli.py)
    130  interrupted (SIGINT) outside the training loop, e.g. while the model is built

Preemption: a signal handler only records the signal (:class:`Preemption`). Once per step the ranks agree on it with
one tiny all-reduce (``distributed/env.any_rank_true``, host memory, gloo), so a signal that reached one rank stops
all of them after the same step. Signals that arrive while stopping (during the checkpoint save) are logged and
ignored. Data-loader workers ignore these signals unless their own training process sends them
(:func:`protect_data_workers`): torchrun forwards a signal to each rank's whole process group and SLURM signals every
process of a job step, and a worker that died of it would take the rank down before it could save.

Fault injection for the tests, like ``checkpoint/dcp.fault_point``: ``TRANSFUSION_FAULT=<name>@<step>`` (that step)
or ``<name>@<step>+`` (that step and every later one), where ``<step>`` is the number the log gives the step (1 =
the first update). Names: ``nan_loss`` (the loss becomes NaN, its gradients stay finite), ``nan_grad`` (one
parameter's gradient becomes NaN, the loss stays finite), ``await_signal`` (before that step every rank waits, up to
two minutes, until some rank holds a preemption signal, so that a test can signal a process at a chosen step).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from typing import Any

log = logging.getLogger("transfusion")

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: temporary failure, the job may be requeued and resumed
NONFINITE_EXIT_CODE = 3


class NonFiniteError(FloatingPointError):
    """The run stopped on non-finite steps (more than ``train.max_bad_steps`` in a row). The message is one line."""


def fault_active(name: str, step: int) -> bool:
    """Whether ``TRANSFUSION_FAULT`` injects fault ``name`` at ``step`` (``name@step`` or ``name@first+``)."""
    spec = os.environ.get("TRANSFUSION_FAULT", "")
    if not spec.startswith(name + "@"):
        return False
    at = spec[len(name) + 1:]
    if at.endswith("+"):
        return at[:-1].isdigit() and step >= int(at[:-1])
    return at.isdigit() and step == int(at)


class Preemption:
    """Records the preemption signals this process receives while :meth:`installed` is active.

        with preemption.installed():
            ...one step...
            if preemption.agreed(step):   # collective: every rank, every step
                save; exit PREEMPTED_EXIT_CODE
    """

    def __init__(self, names: list[str]) -> None:
        self.signals = [signal.Signals[n] for n in dict.fromkeys(names)]  # names checked by the config
        self.received: list[str] = []  # appended by the handler, in arrival order
        self.reported = 0  # how many of ``received`` have been logged
        self.stopping = False  # the ranks agreed to stop: later signals are ignored
        self._pid: int | None = None

    @property
    def requested(self) -> bool:
        """A preemption signal reached this process."""
        return bool(self.received)

    def _handle(self, signum: int, frame: Any) -> None:
        # Only record: the loop acts on it at the end of the step (logging here could re-enter a stream's write).
        if os.getpid() != self._pid:  # a forked data-loader worker: the training process decides when it ends
            return
        self.received.append(signal.Signals(signum).name)

    def installed(self) -> _Installed:
        return _Installed(self)

    def agreed(self, step: int) -> bool:
        """Whether any rank holds a preemption signal (collective: every rank calls it at the same point); logs the
        signals received since the last call. Once true, later signals are only logged as ignored."""
        from transfusion.distributed.env import any_rank_true

        stop = self.stopping or any_rank_true(self.requested)
        self.report(step)
        self.stopping = stop
        return stop

    def report(self, step: int) -> None:
        """Log the signals received since the last report."""
        for i in range(self.reported, len(self.received)):
            name = self.received[i]
            if i == 0 and not self.stopping:
                log.warning("received %s: stopping after step %d with a checkpoint (exit code %d; continue with "
                            "--resume)", name, step, PREEMPTED_EXIT_CODE)
            else:
                log.warning("received %s while stopping: ignored until the checkpoint is saved", name)
        self.reported = len(self.received)

    def wait_for_signal(self, step: int, limit_s: float = 120.0, poll_s: float = 0.05) -> None:
        """Fault hook (``await_signal``): wait until some rank holds a preemption signal. Every rank polls the same
        number of times, so they leave together (after ``limit_s`` without a signal too)."""
        from transfusion.distributed.env import any_rank_true

        log.info("fault injection: waiting before step %d for a preemption signal", step)
        for _ in range(int(limit_s / poll_s)):
            if any_rank_true(self.requested):
                return
            time.sleep(poll_s)


class _Installed:
    """Context manager: the handler for ``Preemption.signals`` inside, the previous handlers restored on exit. Outside
    the main thread (where Python cannot set handlers) it does nothing."""

    def __init__(self, owner: Preemption) -> None:
        self.owner = owner
        self.old: dict[signal.Signals, Any] = {}

    def __enter__(self) -> Preemption:
        owner = self.owner
        owner.received.clear()
        owner.reported, owner.stopping = 0, False
        if owner.signals and threading.current_thread() is threading.main_thread():
            owner._pid = os.getpid()
            for sig in owner.signals:
                self.old[sig] = signal.signal(sig, owner._handle)
        elif owner.signals:
            log.warning("training outside the main thread: preemption signals keep their default actions")
        return owner

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: a handler not set from Python
        self.old.clear()


def protect_data_workers(loaders: Any, names: list[str]) -> None:
    """Make the worker processes of these DataLoaders ignore the signals ``names`` unless their parent (this
    training process) sends them: a signal for the whole process group is the training process's to act on (it ends
    its workers itself), while the loader's own ``terminate()`` of a stuck worker still ends it, as torch's handler
    does. A ``worker_init_fn`` chained before any existing one; runs in each worker (Linux: ``sigwaitinfo``)."""
    if not names or not hasattr(signal, "sigwaitinfo"):
        return
    sigs = tuple(int(signal.Signals[n]) for n in dict.fromkeys(names))
    for loader in loaders:
        if getattr(loader, "num_workers", 0) > 0:
            loader.worker_init_fn = functools.partial(_worker_init, sigs, loader.worker_init_fn)


def _worker_init(sigs: tuple[int, ...], previous: Any, worker_id: int) -> None:
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)  # for every thread of the worker: they are waited for below
    threading.Thread(target=_worker_signals, args=(sigs, parent), name="preempt-signals", daemon=True).start()
    if previous is not None:
        previous(worker_id)


def _worker_signals(sigs: tuple[int, ...], parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(sigs)
        if info.si_pid == parent:  # the loader ending this worker
            os._exit(0)


def ignore_signals(names: list[str]) -> None:
    """Ignore these signals from here on: a preempted process on its way out (a late signal, e.g. torchrun stopping
    the ranks that have not exited yet, must not turn exit code 75 into a death by signal)."""
    if threading.current_thread() is threading.main_thread():
        for name in names:
            signal.signal(signal.Signals[name], signal.SIG_IGN)
