"""Interrupts, runs bound to their cache, atomic run files, and errors before any work (train, eval, the CLI)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.fileio import DiskFullError, atomic_torch_save, atomic_write_text
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.configs import EvalConfig
from pipelines.evaluate import run as run_eval
from mdmf_cache.configs import TrainConfig
from pipelines.train import run as run_train

from conftest import NARROW_FFN as FFN  # these tests are about what a run keeps, not what it learns

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _cfg(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), episodes=32, episodes_per_step=8, val_every=16, val_episodes=40,
                lr=1e-3, seed=0, heads=dict(FFN))
    base.update(kw)
    return TrainConfig(**base)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_exits_130_with_what_is_kept_and_resume_goes_on(demo_cache, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "train", str(demo_cache), "--out", str(out), "--episodes", "1000000",
           "--episodes-per-step", "8", "--val-every", "16", "--val-episodes", "20", "--lr", "1e-3",
           "--head-opt", f"ffn_dim={FFN['ffn_dim']}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    done = torch.load(out / "last.pt", weights_only=False)["episodes"]
    res = run_train(_cfg(demo_cache, out, episodes=done + 16, val_episodes=20, resume=True), progress=False)
    assert res["episodes"] == done + 16


def test_run_is_bound_to_its_cache(demo_cache, tmp_path):
    run_train(_cfg(demo_cache, tmp_path / "run", episodes=16, val_every=16), progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache_identity"]["fingerprint"] == CacheStore(demo_cache).fingerprint

    # the same cache at another path (moved): found with --cache, and resume accepts another spelling of a path
    moved = tmp_path / "moved.zarr"
    shutil.copytree(demo_cache, moved)
    res = run_eval(EvalConfig(target=str(tmp_path / "run"), episodes=20, cache=str(moved)), progress=False)
    assert res["shots"]["5"]["episodes"] == 20
    rel = os.path.relpath(moved)
    run_train(_cfg(rel, tmp_path / "run", episodes=32, val_every=16, resume=True), progress=False)

    # re-extracted with another seed (another class split): eval and resume refuse it, naming what differs
    store = CacheStore(moved, mode="a")
    store.root.attrs["fingerprint"] = {**store.fingerprint, "seed": 1}
    store.root["test"].attrs["classes"] = list(reversed(store.root["test"].attrs["classes"]))
    with pytest.raises(CacheError, match=r"seed.*test classes differ"):
        run_eval(EvalConfig(target=str(tmp_path / "run"), episodes=20, cache=str(moved)), progress=False)
    with pytest.raises(CacheError, match="not the cache this run was trained on"):
        run_train(_cfg(moved, tmp_path / "run", episodes=48, resume=True), progress=False)

    # a cache that is gone: say how to point at it
    gone = tmp_path / "gone.zarr"
    shutil.copytree(demo_cache, gone)
    run_train(_cfg(gone, tmp_path / "run2", episodes=16, val_every=16), progress=False)
    shutil.rmtree(gone)
    with pytest.raises(ConfigError, match="--cache PATH"):
        run_eval(EvalConfig(target=str(tmp_path / "run2"), episodes=20), progress=False)


def test_kill_between_metrics_and_checkpoint_loses_nothing(demo_cache, tmp_path, monkeypatch):
    import mdmf_cache.training.loop as train_mod

    whole = tmp_path / "whole"
    run_train(_cfg(demo_cache, whole), progress=False)

    cut = tmp_path / "cut"
    calls = {"n": 0}
    real = train_mod.atomic_torch_save

    def dies_at_second_last_pt(obj, path):
        if Path(path).name == "last.pt":
            calls["n"] += 1
            if calls["n"] == 2:  # the metrics line of the second validation is written, its last.pt is not
                raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(train_mod, "atomic_torch_save", dies_at_second_last_pt)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(demo_cache, cut), progress=False)
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 2  # the line is ahead of the checkpoint
    monkeypatch.setattr(train_mod, "atomic_torch_save", real)
    run_train(_cfg(demo_cache, cut, resume=True), progress=False)

    def strip(p):
        return [{k: v for k, v in json.loads(x).items() if k != "episodes_per_s"} for x in p.read_text().splitlines()]

    assert strip(cut / "metrics.jsonl") == strip(whole / "metrics.jsonl")
    a, b = (torch.load(p / "last.pt", weights_only=False)["model"] for p in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_writes_keep_the_old_file_and_name_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "best.pt"
    atomic_torch_save({"v": 1}, target)

    def fails(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(DiskFullError, match=rf"disk full while writing {target}.*MB free"):
        atomic_torch_save({"v": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    atomic_write_text(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json").read_text() == "{}"


@pytest.mark.parametrize("kw,match", [
    ({"way": 30}, "the train split has"),
    ({"lr": float("nan")}, "--lr nan"),
    ({"way": 1}, "at least 2 classes"),
    ({"heads": {"views": "xyz"}}, "--head-opt views=xyz: choose both or ltc"),
    ({"device": "cuda:7"}, "this machine has: cpu"),
    ({"device": "foo"}, "not a device name"),
])
def test_bad_training_input_fails_before_anything_is_written(demo_cache, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        run_train(_cfg(demo_cache, tmp_path / "run", **kw), progress=False)
    assert not (tmp_path / "run").exists()


def test_eval_and_ablate_check_everything_before_work(demo_cache, tmp_path):
    from pipelines.ablate import AblateConfig, run as run_ablate

    run_train(_cfg(demo_cache, tmp_path / "run", episodes=16, val_every=16), progress=False)
    with pytest.raises(ConfigError, match="the test split has"):
        run_eval(EvalConfig(target=str(tmp_path / "run"), shots=(1, 20), episodes=20, out=str(tmp_path / "ev")),
                 progress=False)
    assert not (tmp_path / "ev").exists()  # the 1-shot list was not scored first
    for variant, test_episodes, match in (({"views": "xyz"}, 10, "--head-opt views=xyz: choose"), ({"pps": False}, 0, "--test-episodes")):
        with pytest.raises(ConfigError, match=match):
            run_ablate(AblateConfig(cache=str(demo_cache), out=str(tmp_path / "abl"), variant=variant,
                                    test_episodes=test_episodes), progress=False)
        assert not (tmp_path / "abl").exists()  # no arm was trained


def test_cli_errors_are_one_line_exit_2(demo_cache, tmp_path, monkeypatch, capsys):
    """Through the console entry (``cli.main``, in this process: tests/test_cli.py starts the installed one): a bad
    device, a bad number and an unknown model are each one red line and exit status 2, before any work."""
    import logging

    import cli

    handlers = list(logging.getLogger().handlers)
    for args, needle in (
        (["train", str(demo_cache), "--out", str(tmp_path / "r"), "--device", "cuda"], "this machine has: cpu"),
        (["train", str(demo_cache), "--out", str(tmp_path / "r"), "--lr", "nan"], "--lr nan"),
        (["demo", "--out", str(tmp_path / "d"), "--model", "nope"], "not an open_clip model"),
    ):
        monkeypatch.setattr(sys, "argv", ["mdmf-cache", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        assert needle in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    for h in logging.getLogger().handlers:
        if h not in handlers:
            logging.getLogger().removeHandler(h)
    assert not (tmp_path / "d" / "videos").exists()
