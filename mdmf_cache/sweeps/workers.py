"""The trials of a sweep (:mod:`mdmf_cache.sweeps.study`): the objective, a worker's loop, ``--jobs`` worker processes.

A worker runs trials of the study until it holds the sweep's ``trials`` finished ones, whoever ran them,
each a fast-mode training run with the cache's train and val splits loaded once for all of them. With
``jobs`` > 1, :func:`run_processes` reads those splits once into shared memory
(:mod:`mdmf_cache.store.shared`), starts the workers, which map that one copy, removes its name once
they all have it, and on Ctrl-C stops them; the shared memory goes on every exit path.

A worker dies with the sweep process that started it (:class:`_Parent`): on Linux the kernel sends it SIGUSR1
when that process dies (``PR_SET_PDEATHSIG``), and before every trial and at every validation it looks whether its
parent is still the one that started it (where prctl is missing, or the parent died before the worker asked for
the signal). Its trial is then failed and given back to the study (requeued with its parameters, as a killed
worker's trial is by the heartbeat) and the worker exits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from mdmf_cache.errors import ConfigError
from mdmf_cache.sweeps.space import trial_config
from mdmf_cache.sweeps.study import FINISHED, Plan, SweepConfig, count_trials, open_study, open_storage, plan

log = logging.getLogger(__name__)

#: ``train(cfg, progress=..., show=..., on_val=...) -> {"best_val": ..., "episodes_per_s": ...}``
TrainFn = Callable[..., dict[str, Any]]


class _Surplus(Exception):
    """The study already had its trials when this one was created (a race between workers)."""


class _ParentGone(KeyboardInterrupt):
    """The sweep process that started this worker is gone. A KeyboardInterrupt to Optuna and to the training code:
    the trial is failed (no traceback shown), its heartbeat stopped, and nothing takes it for an error."""


class _Parent:
    """A ``--jobs`` worker's watch on the sweep process that started it (its pid, given by that process)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.died = False  # the kernel said so (PR_SET_PDEATHSIG)
        self.running: list = []  # the trial this worker runs now (set by the objective, cleared after it)

    def gone(self) -> bool:
        """True once the parent died: the kernel said so, or the worker was handed to another process (init or a
        subreaper)."""
        return self.died or os.getppid() != self.pid

    def check(self) -> None:
        if self.gone():
            raise _ParentGone(self.pid)

    def die_with_it(self) -> bool:
        """Ask the kernel for SIGUSR1 when the parent dies (``PR_SET_PDEATHSIG``); False where that is missing
        (not Linux): the checks of :meth:`check` alone then stop the worker.

        The signal stops a running trial at once (:class:`_ParentGone`); between trials it leaves the worker to its
        next :meth:`check`, before the next trial, so that no trial is ever created without being given back. Not
        SIGTERM, which the parent sends on Ctrl-C (``terminate()``): the kernel sends the death signal when the
        parent's forking thread ends, and where another of its threads still lives the worker is first handed to
        that one, so ``getppid()`` may still name the dying parent and the signal may come again: a handler could
        not tell a death from a ``terminate()`` by asking.
        """
        if not sys.platform.startswith("linux"):
            return False

        def on_death(signum, frame) -> None:
            if self.died:  # said again as the parent's last thread ends
                return
            self.died = True
            if self.running:
                raise _ParentGone(self.pid)

        signal.signal(signal.SIGUSR1, on_death)
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            return libc.prctl(1, int(signal.SIGUSR1), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return False


def _validation_step(done: int, episodes: int, val_every: int) -> int:
    """The pruner's step for a validation: the val_every multiple crossed (aligned across episodes-per-step)."""
    return done if done >= episodes else (done // val_every) * val_every


def _objective(cfg: SweepConfig, p: Plan, study_trials: int, train: TrainFn, parent: _Parent | None = None,
               current: list | None = None):
    """The objective of one worker; ``current`` (a list) is given the trial it runs; ``parent``: see
    :class:`_Parent`."""
    import optuna

    trials_dir = Path(cfg.out) / "trials"
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        if current is not None:
            current[:] = [trial]
        if parent:
            parent.check()
        ahead = [t for t in trial.study.get_trials(deepcopy=False)
                 if t.number < trial.number and (t.state.name in FINISHED or t.state.name == "RUNNING")]
        if len(ahead) >= study_trials:
            trial.set_user_attr("skipped", "the study had its trials when this one started")
            raise _Surplus()
        values = {d.name: d.suggest(trial) for d in p.dims}
        tcfg = trial_config(p.base, {**p.fixed, **values}, p.opts)
        tcfg.out = str(trials_dir / f"{trial.number:05d}")
        trial.set_user_attr("config", asdict(tcfg))
        trial.set_user_attr("worker", worker)
        t0 = time.perf_counter()

        def on_val(done: int, acc: float) -> None:
            if parent:
                parent.check()
            trial.report(acc, _validation_step(done, tcfg.episodes, tcfg.val_every))
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {acc:.2f}% at {done} episodes")

        try:
            res = train(tcfg, progress=False, show=False, on_val=on_val)
        finally:
            trial.set_user_attr("train_s", time.perf_counter() - t0)
            if not cfg.keep_last:
                Path(tcfg.out, "last.pt").unlink(missing_ok=True)
        trial.set_user_attr("episodes_per_s", res["episodes_per_s"])
        return res["best_val"]

    return objective


def _seed_of(cfg: SweepConfig, worker_index: int, existing: int) -> int:
    """The sampler seed of one worker.

    A lone local worker starting a fresh study uses the sweep seed (a repeatable sweep); a worker
    resuming a study (``existing`` trials) or one of several gets its own, so that no two of them
    draw the same random start-up points.
    """
    if cfg.jobs == 1 and not cfg.storage and existing == 0:
        return cfg.seed
    tag = f"{cfg.seed}:{worker_index}:{existing}"
    if cfg.storage:  # several machines may run the same line
        tag += f":{socket.gethostname()}:{os.getpid()}"
    return int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)


def run_worker(cfg: SweepConfig, worker_index: int, train: TrainFn, on_trial=None, splits=None,
               parent: _Parent | None = None) -> None:
    """Run trials of the study until it holds ``cfg.trials`` finished ones (the cache loaded once).

    Args:
        train: trains one trial's config (``pipelines.train.run``: the sweep recipe passes it; engines never
            import a recipe).
        splits: ``{(cache path, split): FeatureSplit}`` already in memory (the shared copy), used by every trial.
        parent: a ``--jobs`` worker's parent: once it is gone no trial starts, and the running one is failed and
            given back to the study (:class:`_ParentGone` is raised).
    """
    from optuna.storages import fail_stale_trials

    from mdmf_cache.store.read import keep_loaded

    p = plan(cfg)
    storage = open_storage(cfg)
    import optuna

    existing = len(optuna.load_study(study_name=cfg.study_name, storage=storage).get_trials(deepcopy=False))
    study = open_study(cfg, p, storage, _seed_of(cfg, worker_index, existing))
    current: list = parent.running if parent else []
    objective = _objective(cfg, p, cfg.trials, train, parent, current)
    callbacks = [_log_trial] + ([on_trial] if on_trial else [])
    train_log = logging.getLogger("pipelines.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # one line per trial (the callback), not one per validation
    with keep_loaded(splits), _restore_level(train_log, level), _quiet_interrupts():
        while True:
            if parent:
                parent.check()
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fail_stale_trials(study)
            finished, running = count_trials(study)
            if finished >= cfg.trials:
                return
            if finished + running >= cfg.trials:  # others are running the last ones: wait, they may fail
                time.sleep(0.5)  # a look at the study is cheap: stop soon after the last one finishes
                continue
            current.clear()
            try:
                study.optimize(objective, n_trials=1, catch=(_Surplus,), callbacks=callbacks, gc_after_trial=False)
            except _ParentGone:
                _stop_heartbeats()
                _give_back(study, current)
                raise
            except BaseException as e:
                _stop_heartbeats()
                interrupt = _interrupt_behind(e)
                if interrupt is not None and interrupt is not e:
                    raise interrupt from None
                raise
            current.clear()


def _interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt ``err`` is, or stands for: a Ctrl-C that lands while Optuna records a trial's result
    leaves its ``finally`` block reading a name it never set (``UnboundLocalError``, with the interrupt as its
    context), which would hide the Ctrl-C behind a library error."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__context__
    return None


def _give_back(study, current: list) -> None:
    """The trial this worker was running when its parent died: failed (if Optuna had not yet said so) and requeued
    with its parameters, as the heartbeat requeues a killed worker's, so that ``--resume`` runs it again."""
    if not current:
        return
    import warnings

    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    trial = current[0]
    try:
        storage = study._storage
        frozen = storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            frozen = storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.FAIL and not frozen.user_attrs.get("skipped"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the callback is "deprecated"
                RetryFailedTrialCallback(max_retry=3)(study, frozen)
            log.warning("trial %d given back to the study (it runs again on --resume)", frozen.number)
    except Exception as e:  # noqa: BLE001 - the storage went with the parent: the heartbeat requeues it later
        log.warning("trial %d could not be given back (%s); --resume requeues it once it is stale", trial.number,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)


def _stop_heartbeats() -> None:
    """Stop every Optuna heartbeat thread of this process that still runs.

    The thread is not a daemon, and a Ctrl-C that lands while it starts (before Optuna's ``with`` block is
    entered) leaves it beating: the process would then never exit after the CLI's "interrupted" line.
    """
    import threading

    from optuna.storages._heartbeat import HeartbeatThread

    for thread in threading.enumerate():
        if getattr(thread, "_target", None) is HeartbeatThread._record_heartbeat:
            thread._args[2].set()  # (trial_id, storage, stop_event)
            thread.join(timeout=10)


class _NoInterruptTraceback(logging.Filter):
    """Drops Optuna's two "trial failed" records (the first with a traceback) of a trial stopped by Ctrl-C."""

    def __init__(self) -> None:
        super().__init__()
        self.next: str | None = None  # the start of the second record, once the first was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.next = msg.split(" failed with parameters", 1)[0] + " failed with value"
            return False
        if self.next is not None and msg.startswith(self.next):
            self.next = None
            return False
        return True


@contextmanager
def _quiet_interrupts():
    """Ctrl-C during a trial: Optuna marks it failed and re-raises; its record of that is not shown (the CLI
    says what was kept)."""
    optuna_log = logging.getLogger("optuna.study._optimize")
    flt = _NoInterruptTraceback()
    optuna_log.addFilter(flt)
    try:
        yield
    finally:
        optuna_log.removeFilter(flt)


@contextmanager
def _restore_level(logger: logging.Logger, level: int):
    try:
        yield
    finally:
        logger.setLevel(level)


def _log_trial(study, trial) -> None:
    if trial.user_attrs.get("skipped"):
        return
    value = trial.value if trial.value is not None else (
        trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else float("nan"))
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    log.info("trial %d %s: val %.2f%% (%s)", trial.number, trial.state.name.lower(), value, params)


def _worker_main(cfg_dict: dict[str, Any], worker_index: int, threads: int, train: TrainFn, shared=None,
                 attached=None, parent_pid: int | None = None) -> None:
    """Entry of a ``--jobs`` worker process; ``shared``: the parent's :class:`SharedSplit` handles, mapped here
    (then ``attached`` is set); ``parent_pid``: the sweep process that started it (the worker dies with it)."""
    from mdmf_cache.process import skip_the_exit_collection

    skip_the_exit_collection()  # ~1.4 s of CPU at a worker's exit, a quarter of a short worker's life
    parent = _Parent(parent_pid if parent_pid is not None else os.getppid())
    logging.basicConfig(level=logging.INFO, format=f"[worker {worker_index}] %(message)s")
    try:
        parent.die_with_it()
        parent.check()  # it may have died before the kernel was asked to say so
        import torch

        torch.set_num_threads(threads)
        splits = {}
        if shared:
            from mdmf_cache.store.shared import attach, size_text

            splits = {(h.cache, h.split): attach(h) for h in shared}
            attached.set()
            log.info("features: %s mapped from one shared copy (%s)",
                     ", ".join(f"{h.split} {'x'.join(map(str, h.shape))}" for h in shared),
                     size_text(sum(h.nbytes for h in shared)))
        run_worker(SweepConfig(**cfg_dict), worker_index, train, splits=splits, parent=parent)
    except _ParentGone:
        log.warning("the sweep process %d is gone (killed?): this worker stops", parent.pid)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the parent says what was kept
        raise SystemExit(130) from None


def run_processes(cfg: SweepConfig, train: TrainFn, bar=None) -> None:
    """Run ``cfg.jobs`` worker processes on this machine (one copy of the features shared) until they stop; each
    trains its trials with ``train`` (a module-level function: the spawned workers import it by name)."""
    import multiprocessing as mp

    from mdmf_cache.store.shared import remove_stale_semaphores

    remove_stale_semaphores()  # what a sweep killed with all its processes left
    ctx = mp.get_context("spawn")  # no fork of a process holding torch threads or DB connections
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    with _shared_features(cfg) as shared:
        handles = shared.splits if shared else None
        attached = [ctx.Event() for _ in range(cfg.jobs)]
        me = os.getpid()
        procs = [ctx.Process(target=_worker_main, args=(asdict(cfg), i, threads, train, handles, attached[i], me),
                             daemon=False) for i in range(cfg.jobs)]
        started = []
        study = None
        try:
            for proc in procs:
                proc.start()
                started.append(proc)
            while any(proc.is_alive() for proc in procs):
                mapped = all(e.is_set() or not p.is_alive() for e, p in zip(attached, procs))
                if shared and not shared.unlinked and mapped:
                    shared.unlink()  # every worker maps it: the memory now goes with the last of them, however it ends
                _tick(0.2 if shared and not shared.unlinked else 1.0, procs)
                if bar:
                    if study is None:
                        import optuna

                        study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg))
                    bar.refresh_from(study)
        except KeyboardInterrupt:
            for proc in started:
                proc.terminate()
            raise
        finally:
            for proc in started:
                proc.join()
    _check_exits(cfg, [proc.exitcode for proc in procs])


def _check_exits(cfg: SweepConfig, codes: list[int | None]) -> None:
    """What the workers' exit codes mean: nothing when they all ended well, or when those killed by a signal (by
    hand, the out-of-memory killer) left a study that the others finished (a warning); else a one-line error."""
    errors = [i for i, c in enumerate(codes) if c is not None and c > 0]
    killed = {i: c for i, c in enumerate(codes) if c is None or c < 0}
    if errors:
        raise ConfigError(f"sweep worker(s) {', '.join(map(str, errors))} stopped with an error (see above); "
                          "fix it and rerun with --resume")
    if not killed:
        return
    how = "; ".join(f"sweep worker {i} was killed by {_signal_name(c)}" for i, c in killed.items())
    try:
        import optuna

        finished, _ = count_trials(optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg)))
    except Exception:  # noqa: BLE001 - the storage cannot be read now: say what is known
        finished = None
    if finished is not None and finished >= cfg.trials:
        log.warning("%s (by hand, or the out-of-memory killer); the other worker(s) finished the study's %d trials "
                    "(a trial it was running is failed by the heartbeat and run again)", how, cfg.trials)
        return
    done = f"{finished} of {cfg.trials} trials finished" if finished is not None else "the finished trials are kept"
    raise ConfigError(f"{how} (by hand, or the out-of-memory killer: see dmesg); {done}; rerun the same command with "
                      "--resume to run the rest (its trial is run again)")


def _signal_name(code: int | None) -> str:
    """``SIGKILL`` for a process's exit code -9."""
    if code is None:
        return "an unknown signal"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _tick(seconds: float, procs=()) -> None:
    """The parent's wait between looks at its workers: ``seconds``, or less where one of ``procs`` ends."""
    from multiprocessing.connection import wait

    alive = [p.sentinel for p in procs if p.is_alive()]
    if alive:
        wait(alive, timeout=seconds)
    else:
        time.sleep(seconds)


@contextmanager
def _shared_features(cfg: SweepConfig):
    """The train and val features read once into shared memory for the workers (None: sharing off, or no room)."""
    if not cfg.share_features:
        yield None
        return
    from mdmf_cache.store.shared import NoRoom, SharedFeatures, size_text

    try:
        shared = SharedFeatures(cfg.cache, ("train", "val"))
    except NoRoom as e:
        log.warning("%s: each of the %d workers loads its own copy of the features", e, cfg.jobs)
        yield None
        return
    with shared:
        log.info("features read once into %s (%s) for %d workers", Path(shared.files[0]).parent,
                 size_text(shared.nbytes), cfg.jobs)
        yield shared


__all__ = ["run_worker", "run_processes"]
