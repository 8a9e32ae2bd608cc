"""``sweep --jobs J``: one copy of the features in shared memory for every worker of a machine.

The shared split is the loaded split, bit for bit, without a copy; two workers on it train exactly what one process
trains from the cache, as do two workers with a copy each; nothing is left in shared memory after a sweep, an
interrupted one, or (the next time) a killed one."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdmf_cache.sweeps.study import SweepConfig
from pipelines.sweep import run as run_sweep

# 5-way 1-shot trials on the demo cache: two updates, one validation
TRIAL = {"shot": 1, "episodes": 8, "episodes-per-step": 4, "val-every": 8, "val-episodes": 10, "ffn-dim": 64}


def _ours() -> set[tuple[str, str]]:
    """This process's shared files (named after its host and pid) and its mappings of them: ("file"|"map", path)."""
    from mdmf_cache.store.shared import PREFIX, directories

    tag = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-"
    files = {("file", str(p)) for d in directories() if d.is_dir() for p in d.glob(tag + "*")}
    with open("/proc/self/maps") as f:
        maps = {("map", line.split(None, 5)[-1].strip()) for line in f if tag in line}
    return files | maps


def _named() -> bool:
    return any(kind == "file" for kind, _ in _ours())


def _cfg(cache: Path, out: Path, **kw) -> SweepConfig:
    return SweepConfig(cache=str(cache), out=str(out), trials=2, jobs=2, prune=False, space={"lr": "1e-4:1e-2:log"},
                       fixed=dict(TRIAL), **kw)


def test_a_shared_split_is_the_loaded_split_without_a_copy(demo_cache, monkeypatch):
    from mdmf_cache.store.shared import SharedFeatures

    with SharedFeatures(demo_cache, ("train", "val")) as shared:
        assert {Path(p).parent for p in shared.files} == {Path("/dev/shm")} and _named()
        _check_views(shared, demo_cache, monkeypatch)
    assert not _ours()  # names gone; this process's mappings with the views (and the parent's by close)


def _check_views(shared, demo_cache: Path, monkeypatch) -> None:
    import mdmf_cache.store.read as store_read
    from mdmf_cache.store.shared import attach
    from mdmf_cache.store.read import keep_loaded, load_split_features

    for h in shared.splits:
        ref = load_split_features(demo_cache, h.split)
        a, b = attach(h), attach(h)
        assert torch.equal(a.features, ref.features) and a.features.dtype == torch.float16
        assert torch.equal(a.labels, ref.labels) and torch.equal(a.text, ref.text)
        assert (a.video_ids, a.classes, a.class_names) == (ref.video_ids, ref.classes, ref.class_names)
        a.features[0] += 1  # copy-on-write: a write stays in its own mapping, never reaches another
        assert torch.equal(b.features, ref.features)
    # a worker hands its mapped splits to load_split_features: returned as they are, and moved to another device
    # from memory, the cache not read again
    mapped = {(h.cache, h.split): attach(h) for h in shared.splits}
    key = str(Path(demo_cache).resolve())
    monkeypatch.setattr(store_read, "read_split", lambda *a, **k: pytest.fail("read the cache again"))
    with keep_loaded(mapped):
        assert load_split_features(demo_cache, "train") is mapped[key, "train"]
        moved = load_split_features(demo_cache, "val", device="meta")
        assert moved.features.device.type == "meta" and moved.features.shape == mapped[key, "val"].features.shape
        assert load_split_features(demo_cache, "val", device="meta") is moved


def test_no_room_is_said_and_leaves_nothing(demo_cache, monkeypatch, caplog):
    import mdmf_cache.store.shared as sf
    from mdmf_cache.sweeps.workers import _shared_features

    monkeypatch.setattr(sf, "_free", lambda folder: 0)
    with pytest.raises(sf.NoRoom, match="no room for .* of train features in /dev/shm"):
        sf.SharedFeatures(demo_cache, ("train", "val"))
    assert not _ours()
    caplog.set_level(logging.WARNING)
    with _shared_features(_cfg(demo_cache, Path("unused"))) as shared:
        assert shared is None  # the sweep goes on, each worker with its own copy
    assert "each of the 2 workers loads its own copy" in caplog.text


def test_files_of_a_killed_sweep_are_removed_by_the_next(tmp_path, monkeypatch):
    import mdmf_cache.store.shared as sf

    monkeypatch.setattr(sf, "directories", lambda: [tmp_path])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f"{sf.PREFIX}{host}-{dead}-0123abcd-train"
    alive = tmp_path / f"{sf.PREFIX}{host}-{os.getpid()}-0123abcd-train"
    elsewhere = tmp_path / f"{sf.PREFIX}{host}x-{dead}-0123abcd-train"  # another machine's (a shared /tmp)
    for p in (stale, alive, elsewhere):
        p.touch()
    assert sf.remove_stale() == [stale]
    assert alive.exists() and elsewhere.exists()


def _two_workers(cache: Path, out: Path, share: bool, refs: dict) -> None:
    """A --jobs 2 sweep of two trials, each checked against the same trial trained in this process on the split
    loaded from the cache: the same val accuracy and, bit for bit, the same best.pt weights. ``refs``: those
    trainings by their config (without ``out``), each trained once for both sweeps (the same computation)."""
    import json

    import optuna

    from mdmf_cache.configs import TrainConfig
    from pipelines.train import run as run_train

    cfg = _cfg(cache, out, share_features=share)
    res = run_sweep(cfg, progress=False)
    assert [r["state"] for r in res["rows"]] == ["COMPLETE"] * 2
    trials = [t for t in optuna.load_study(study_name=cfg.study_name, storage=cfg.storage_url).get_trials()
              if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # a worker's threads (the order of float reductions)
    try:
        for t in trials:
            key = json.dumps({k: v for k, v in t.user_attrs["config"].items() if k != "out"}, sort_keys=True)
            if key not in refs:
                ref = dict(t.user_attrs["config"], out=str(out / "reference" / str(t.number)))
                refs[key] = (run_train(TrainConfig(**ref), progress=False)["best_val"], ref["out"])
            best_val, ref_out = refs[key]
            assert best_val == t.value, (t.number, t.params)
            a, b = (torch.load(Path(d) / "best.pt", weights_only=False)["model"]
                    for d in (t.user_attrs["config"]["out"], ref_out))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (t.number, t.params)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
def test_two_workers_on_one_shared_copy_train_what_two_copies_train(demo_cache, tmp_path, monkeypatch, capfd):
    import mdmf_cache.sweeps.workers as workers

    assert not _ours()
    seen: list[bool] = []  # at each look of the parent at its workers: do the files still have names?
    real = workers._tick
    monkeypatch.setattr(workers, "_tick", lambda s, *procs: (seen.append(_named()), real(s, *procs)))
    refs: dict = {}
    _two_workers(demo_cache, tmp_path / "shared", True, refs)
    err = capfd.readouterr().err
    assert err.count("mapped from one shared copy") == 2, err[-3000:]  # each worker, no load of its own
    # named while the workers started, unnamed once both mapped them (a SIGKILL now would leave nothing)
    assert seen[0] and not seen[-1], seen
    assert not _ours()  # after the sweep: no file, no mapping in this process, the workers gone
    _two_workers(demo_cache, tmp_path / "separate", False, refs)  # and the same with a copy per worker
    assert "shared copy" not in capfd.readouterr().err


def test_an_interrupted_jobs_sweep_leaves_no_shared_memory(demo_cache, tmp_path, monkeypatch):
    import mdmf_cache.sweeps.workers as workers

    seen: list[set[tuple[str, str]]] = []

    def ctrl_c(seconds: float, *procs) -> None:  # Ctrl-C while the workers start
        seen.append(_ours())
        raise KeyboardInterrupt

    monkeypatch.setattr(workers, "_tick", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(demo_cache, tmp_path / "sw"), progress=False)
    assert len(seen) == 1 and len(seen[0]) == 4, seen  # train and val, each named and mapped, when it came
    assert not _ours() and not multiprocessing.active_children()


def _semaphore_holder(name: str, hold: bool) -> subprocess.Popen:
    """A process that creates multiprocessing's POSIX semaphore ``/NAME`` (no resource tracker to remove it) and
    holds it until its stdin closes (``hold``), or dies at once by SIGKILL, as a killed sweep's processes do."""
    code = ("import _multiprocessing, os, signal, sys; s = _multiprocessing.SemLock(1, 1, 1, sys.argv[1], False); "
            "print('ready', flush=True); sys.stdin.read() if sys.argv[2] == '1' else os.kill(os.getpid(), 9)")
    proc = subprocess.Popen([sys.executable, "-c", code, f"/{name}", "1" if hold else "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.skipif(not (Path("/dev/shm").is_dir() and Path("/proc/self/maps").is_file()), reason="Linux semaphores")
def test_semaphores_of_a_killed_sweep_are_removed_by_the_next_and_a_live_ones_kept(demo_cache, tmp_path, monkeypatch):
    """kill -9 of a whole --jobs sweep (its resource tracker too) leaves multiprocessing's sem.mp-* files in /dev/shm:
    the next --jobs sweep removes those no live process has open, never one that a live process holds."""
    import _multiprocessing
    import secrets

    import mdmf_cache.sweeps.workers as workers

    tag = secrets.token_hex(3)
    dead_name, live_name = f"mp-mdmftest{tag}dead", f"mp-mdmftest{tag}live"
    dead, live = Path(f"/dev/shm/sem.{dead_name}"), Path(f"/dev/shm/sem.{live_name}")
    killed = _semaphore_holder(dead_name, hold=False)
    assert killed.wait(timeout=30) == -9
    holder = _semaphore_holder(live_name, hold=True)  # another sweep, running
    try:
        assert dead.exists() and live.exists()

        def ctrl_c(seconds: float, *procs) -> None:  # the next sweep, stopped as soon as its workers start
            raise KeyboardInterrupt

        monkeypatch.setattr(workers, "_tick", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(_cfg(demo_cache, tmp_path / "sw"), progress=False)
        assert not dead.exists()
        assert live.exists()
    finally:
        holder.communicate(timeout=30)
        for name in (dead_name, live_name):
            try:
                _multiprocessing.sem_unlink(f"/{name}")
            except OSError:
                pass
