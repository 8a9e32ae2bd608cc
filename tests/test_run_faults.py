"""The run side under a demanding user: no silent wrong result, one clear line (exit 2) for every user error.

Diverged training, two trains on one run directory, damaged run files (config.json, metrics.jsonl,
best.pt, last.pt, backbone.pt), a full-mode run's eval cache kept in step with its video tree, option
values checked before anything is written, short videos warned about, Ctrl-C in a sweep, OS errors
named by path, and a full-mode run resumed from a moved video tree.
"""

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

import cli
from mdmf_cache.configs import EvalConfig, TrainConfig
from mdmf_cache.errors import ConfigError, DatasetError
from pipelines.evaluate import run as run_eval
from pipelines.train import run as run_train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

#: A 2-way 1-shot fast-mode run on ``tiny_cache`` (5/2/2 classes of 4 videos): two validations.
FAST = dict(way=2, shot=1, train_queries=1, episodes=16, episodes_per_step=4, val_every=8, val_episodes=10, lr=1e-3,
            heads={"ffn_dim": 64})


def _fast(cache, out, **kw) -> TrainConfig:
    return TrainConfig(cache=str(cache), out=str(out), **{**FAST, **kw})


def _fast_args(cache, out, *extra: str) -> list[str]:
    return ["train", str(cache), "--out", str(out), "--way", "2", "--shot", "1", "--train-queries", "1",
            "--episodes", "16", "--episodes-per-step", "4", "--val-every", "8", "--val-episodes", "10",
            "--lr", "1e-3", "--head-opt", "ffn_dim=64", "--device", "cpu", *extra]


def _main(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """The console entry in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mdmf-cache", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------- divergence


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_validation(tiny_cache, tmp_path, capsys,
                                                                            monkeypatch):
    """The head's loss is made NaN from its 3rd update on (episodes 9-12): the run stops at the validation at
    episode 16, names episode 12 and the loss parts, and last.pt / best.pt / metrics.jsonl are those of episode 8."""
    from mdmf_cache.heads.mdmf import MDMF

    real, calls = MDMF.loss, {"n": 0}

    def poisoned(self, out, labels, classes=None):
        loss, parts = real(self, out, labels, classes)
        calls["n"] += 1
        if calls["n"] >= 3:
            loss = loss * float("nan")
            parts = {**parts, "total": loss.detach()}
        return loss, parts

    monkeypatch.setattr(MDMF, "loss", poisoned)
    out = tmp_path / "run"
    code, err = _main(_fast_args(tiny_cache, out), capsys, monkeypatch)
    _one_line(code, err, "training diverged", "from episode 12", "total=nan", "last.pt holds the run at episode 8",
              "lower --lr")
    assert torch.load(out / "last.pt", weights_only=False)["episodes"] == 8
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["episodes"] == 8 and all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert [json.loads(x)["episodes"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [8]
    # the corrected command (another --out) is not blocked; the diverged run's directory is not locked
    monkeypatch.setattr(MDMF, "loss", real)
    assert run_train(_fast(tiny_cache, tmp_path / "again"), progress=False)["episodes"] == 16


def test_weights_that_stop_being_finite_are_caught_even_with_a_finite_loss(tiny_cache, tmp_path, monkeypatch):
    """An optimiser step that writes NaN into the weights (e.g. an infinite gradient) is stopped before it can be
    validated into best.pt; here before the first validation, so nothing was saved."""
    real = torch.optim.Adam.step
    steps = {"n": 0}

    def step(self, closure=None):
        res = real(self, closure)
        steps["n"] += 1
        if steps["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return res

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    from mdmf_cache.errors import TrainingError

    with pytest.raises(TrainingError, match="weights are not finite after episode 8; stopped, nothing was saved"):
        run_train(_fast(tiny_cache, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_distillation_of_an_episode_without_reliable_queries_has_a_finite_gradient():
    """An episode whose reliability weights are all zero contributes 0, and no NaN gradient (this made a full-mode
    run's weights NaN within two updates; the loss itself stayed finite)."""
    from mdmf_cache.heads.mdmf_losses import _weighted_mean

    values = torch.tensor([[9.0, 7.0], [9.0, 7.0]], requires_grad=True)  # (E, Q) KL terms
    gate = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # episode 0: no reliable query
    conf = torch.tensor([[1.5, 1.2], [1.5, 1.2]], requires_grad=True)
    mean = _weighted_mean(values, gate * conf)
    assert mean.tolist() == [0.0, 9.0]
    mean.sum().backward()
    assert torch.isfinite(values.grad).all() and torch.isfinite(conf.grad).all()
    assert values.grad[0].tolist() == [0.0, 0.0] and values.grad[1].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ run lock


def test_a_second_train_on_one_run_directory_is_refused_naming_the_first(tiny_cache, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mdmf_cache.store.runs import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in (False, True):
            with pytest.raises(ConfigError, match=rf"another train \(pid {holder.pid} on .*\) is writing {out}"):
                run_train(_fast(tiny_cache, out, resume=resume), progress=False)
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of a run was written by the refused ones
    finally:
        holder.kill()  # a killed holder releases the lock
        holder.wait()
    assert run_train(_fast(tiny_cache, out), progress=False)["episodes"] == 16


def test_a_run_stopped_on_bad_input_leaves_no_directory(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="the val split has 2"):
        run_train(_fast(tiny_cache, tmp_path / "a" / "run", way=3), progress=False)
    assert not (tmp_path / "a").exists()  # nor the lock, nor the parent it created


# ------------------------------------------------------------------------------------ damaged run files


@pytest.fixture(scope="module")
def fast_run(tiny_cache, tmp_path_factory):
    """A finished 2-validation fast run (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("fast") / "run"
    run_train(_fast(tiny_cache, out), progress=False)
    return out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("name, damage", [
    ("best.pt", _truncate),
    ("config.json", lambda p: p.write_text('{"mode": "fast", "cache": ')),
])
def test_eval_of_a_damaged_run_file_names_it(fast_run, tmp_path, capsys, monkeypatch, name, damage):
    run = _copy(fast_run, tmp_path / "run")
    damage(run / name)
    code, err = _main(["eval", str(run), "--episodes", "10", "--way", "2", "--device", "cpu"], capsys, monkeypatch)
    _one_line(code, err, f"{run / name} is damaged")
    assert not list(run.glob("eval_*"))  # nothing written


def test_resume_of_a_damaged_run_says_what_to_do_or_repairs_it(fast_run, tiny_cache, tmp_path, capsys, monkeypatch):
    args = lambda run: _fast_args(tiny_cache, run, "--resume")  # noqa: E731
    # last.pt truncated: cannot be continued (named), best.pt still evaluates
    run = _copy(fast_run, tmp_path / "last")
    _truncate(run / "last.pt")
    code, err = _main(args(run), capsys, monkeypatch)
    _one_line(code, err, f"{run / 'last.pt'} is damaged", "cannot be continued")
    assert run_eval(EvalConfig(target=str(run), way=2, episodes=10, device="cpu"), progress=False)["shots"]["1"]
    # config.json garbled: --resume cannot compare the settings
    run = _copy(fast_run, tmp_path / "config")
    (run / "config.json").write_text("{")
    code, err = _main(args(run), capsys, monkeypatch)
    _one_line(code, err, f"{run / 'config.json'} is damaged", "restore it")
    # metrics.jsonl garbled in the middle: --resume rewrites it from last.pt (the run is finished: nothing trains)
    run = _copy(fast_run, tmp_path / "metrics")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("{oops\n" + "\n".join(lines[1:]) + "\n")
    code, err = _main(["plot", str(run)], capsys, monkeypatch)
    _one_line(code, err, f"{run / 'metrics.jsonl'} is damaged (ValueError: line 1 is not JSON)", "--resume")
    code, err = _main(args(run), capsys, monkeypatch)
    assert code == 0, err
    assert (run / "metrics.jsonl").read_text().splitlines() == lines
    # best.pt truncated, and the last validation was the best: --resume rebuilds it from last.pt (the record made
    # to say so: the tiny run's two validations may tie)
    last = torch.load(fast_run / "last.pt", weights_only=False)
    h8, h16 = last["history"]

    def with_best(run: Path, at: int) -> None:
        acc = 50.0
        hist = [dict(h8, val_acc=acc if at == 8 else acc - 10), dict(h16, val_acc=acc if at == 16 else acc - 10)]
        torch.save(dict(last, best_val=acc, history=hist), run / "last.pt")
        _truncate(run / "best.pt")

    run = _copy(fast_run, tmp_path / "best")
    with_best(run, 16)
    code, err = _main(args(run), capsys, monkeypatch)
    assert code == 0, err
    rebuilt = torch.load(run / "best.pt", weights_only=False)
    assert rebuilt["episodes"] == 16 and rebuilt["val_acc"] == 50.0
    assert all(torch.equal(rebuilt["model"][k], last["model"][k]) for k in last["model"])
    # ... and when it was not (the best is at episode 8): said, exit 2, instead of exit 0 naming a broken checkpoint
    run = _copy(fast_run, tmp_path / "best8")
    with_best(run, 8)
    code, err = _main(args(run), capsys, monkeypatch)
    _one_line(code, err, f"{run / 'best.pt'} is damaged", "not the best validation (episode 8)", "another --out")


def test_train_config_file_with_a_wrong_type_names_the_field(fast_run, tmp_path, capsys, monkeypatch):
    cfg = json.loads((fast_run / "config.json").read_text())
    for field, value, needle in (("episodes", "many", "field 'episodes' must be int, got \"many\""),
                                 ("heads", [1], "field 'heads' must be dict")):
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({**cfg, field: value}))
        code, err = _main(["train", "--config", str(path), "--out", str(tmp_path / "r")], capsys, monkeypatch)
        _one_line(code, err, f"--config {path}", needle)
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------------------- option values


def test_option_values_are_checked_before_anything_is_written(tiny_cache, tmp_path, capsys, monkeypatch):
    from mdmf_cache.sweeps.space import parse_space_text

    for heads, needle in (({"lam": -1.0}, "--head-opt lam=-1.0: must be a finite number >= 0"),
                          ({"alpha_gtc": -0.5}, "alpha_gtc=-0.5"),
                          ({"alpha_ltc": 0.0, "alpha_gtc": 0.0}, "both 0")):
        with pytest.raises(ConfigError, match=needle):
            run_train(_fast(tiny_cache, tmp_path / "r", heads=heads), progress=False)
    with pytest.raises(ConfigError, match="names lr twice"):
        parse_space_text("lr=1e-4:1e-2,lambda=0.1:2,lr=1e-3:1e-1")
    out = tmp_path / "sw"
    for args, needle in ((_fast_args(tiny_cache, out, "--lambda", "-1"), "--lambda -1.0: must be"),
                         (_fast_args(tiny_cache, out, "--seed", "-3"), "--seed -3: must be >= 0"),
                         (["sweep", str(tiny_cache), "--out", str(out), "--prune-startup", "-1"], "--prune-startup -1"),
                         (["sweep", str(tiny_cache), "--out", str(out), "--seed", "-1"], "--seed -1"),
                         (["sweep", str(tiny_cache), "--out", str(out), "--space", "lr=1e-4:1e-2,lr=1e-3:1e-1"],
                          "names lr twice"),
                         (["eval", str(tiny_cache), "--method", "protonet", "--seed", "-2"], "--seed -2"),
                         (["demo", "--out", str(out), "--workers", "-1"], "--workers -1")):
        code, err = _main(args, capsys, monkeypatch)
        _one_line(code, err, needle)
        assert not out.exists(), args  # no study.db left to refuse the corrected command


def test_bad_head_options_are_one_line_naming_them_before_anything_is_written(tiny_cache, tmp_path, capsys,
                                                                              monkeypatch):
    """--head-opt NaN/inf/non-sizes of any head, and heads that do not split the cache's width, are refused in one line
    naming the option as written (never a placeholder width); nothing is left that refuses the corrected command."""
    from mdmf_cache.store.cache import CacheStore

    width = CacheStore(tiny_cache).root["train"]["features"].shape[-1]
    out = tmp_path / "r"
    for extra, needle in ((("--head-opt", "ffn_dim=0"), "--head-opt ffn_dim=0: must be an integer >= 1"),
                          (("--head-opt", "tcn_levels=-2"), "--head-opt tcn_levels=-2: must be an integer >= 1"),
                          (("--method", "clip-fsar", "--head-opt", "cos_eps=nan"), "--head-opt cos_eps=nan: must be a "
                                                                                   "finite number"),
                          (("--method", "mpl", "--head-opt", "proto_dropout=inf"), "--head-opt proto_dropout=inf"),
                          (("--head-opt", f"heads={width - 1}"), f"--head-opt heads={width - 1}: must divide the "
                                                                 f"features' width D={width}")):
        code, err = _main(_fast_args(tiny_cache, out, *extra), capsys, monkeypatch)
        _one_line(code, err, needle)
        assert "dim=" not in err.replace("ffn_dim=", ""), err
        assert not out.exists(), extra
    code, err = _main(_fast_args(tiny_cache, out, "--head-opt", "tcn_levels=2"), capsys, monkeypatch)
    assert code == 0, err


def test_a_sweep_checks_fixed_options_and_space_bounds_before_the_study(tiny_cache, tmp_path, capsys, monkeypatch):
    """A bad fixed head option (named as the sweep's --NAME) or a non-finite --space bound is refused before the study
    is created: no study.db is left to refuse the corrected command."""
    out = tmp_path / "sw"
    base = ["sweep", str(tiny_cache), "--out", str(out), "--trials", "1", "--way", "2", "--shot", "1",
            "--train-queries", "1", "--device", "cpu"]
    for extra, needle in ((("--ffn-dim", "-5"), "--ffn-dim -5: must be an integer >= 1"),
                          (("--cos-eps", "nan"), "--cos-eps nan: must be a finite number"),
                          (("--space", "lr=nan:1"), "--space lr=nan:1: LOW and HIGH must be finite numbers"),
                          (("--space", "lambda=0.5:inf"), "--space lambda=0.5:inf: LOW and HIGH must be finite"),
                          (("--space", "pps-temperature=-1:0.1"), "--space pps-temperature: its end -1.0: must be a "
                                                                   "finite number > 0")):
        code, err = _main([*base, *extra], capsys, monkeypatch)
        _one_line(code, err, needle)
        assert not out.exists(), extra


# ------------------------------------------------------------------------------------------ OS errors


def test_os_errors_are_one_line_naming_the_path(tiny_cache, tmp_path, capsys, monkeypatch):
    import pipelines.train

    target = tmp_path / "run" / "last.pt"
    for err, needle in ((OSError(errno.ENOSPC, "No space left on device", str(target)), f"disk full while writing {target}"),
                        (OSError(errno.ENOSPC, "No space left on device"), "disk full (No space left on device)"),
                        (PermissionError(errno.EROFS, "Read-only file system", str(target)), f"cannot access {target}")):
        def fails(cfg, err=err):
            raise RuntimeError("zarr could not write its metadata") from err

        monkeypatch.setattr(pipelines.train, "run", fails)
        code, out = _main(_fast_args(tiny_cache, tmp_path / "run"), capsys, monkeypatch)
        _one_line(code, out, needle)
    # a write that names no file (an append, numpy's savez) is given its path
    from mdmf_cache.fileio import writing

    with pytest.raises(OSError) as got:
        with writing(target):
            raise OSError(errno.EIO, "Input/output error")
    assert got.value.filename == str(target) and got.value.errno == errno.EIO
    # a run directory that cannot be created: said before any work
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = _main(_fast_args(tiny_cache, blocker / "run"), capsys, monkeypatch)
    _one_line(code, out, f"cannot create {blocker / 'run'}", "writable storage")


# ---------------------------------------------------------------------------------------------- full mode


def _full_cfg(root, out, **kw) -> TrainConfig:
    full = {"dataset": "folder", "root": str(root), "model": "mdmf-tiny-vit", "pretrained": None, "workers": 0,
            "flip": False, **kw.pop("full", {})}
    base = dict(mode="full", out=str(out), way=2, shot=1, train_queries=1, episodes=4, episodes_per_step=2, val_every=4,
                val_episodes=6, lr=1e-3, device="cpu", heads={"ffn_dim": 64}, full=full)
    return TrainConfig(**{**base, **kw})


def _full_args(root, out, *extra: str) -> list[str]:
    return ["train", "--mode", "full", "folder", "--root", str(root), "--model", "mdmf-tiny-vit", "--pretrained", "none",
            "--workers", "0", "--no-flip", "--out", str(out), "--way", "2", "--shot", "1", "--train-queries", "1",
            "--episodes", "4", "--episodes-per-step", "2", "--val-every", "4", "--val-episodes", "6", "--lr", "1e-3",
            "--head-opt", "ffn_dim=64", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def full_run(action_videos, tmp_path_factory):
    """A finished one-validation full-mode run on a copy of ``action_videos`` (read-only: tests copy it)."""
    base = tmp_path_factory.mktemp("full")
    root = base / "videos"
    shutil.copytree(action_videos, root)
    out = base / "run"
    run_train(_full_cfg(root, out), progress=False)
    return root, out


def _test_videos(cache: str) -> list[str]:
    from mdmf_cache.store.read import load_split_features

    return load_split_features(cache, "test").video_ids


def test_eval_of_a_full_run_follows_its_video_tree(full_run, tmp_path):
    from mdmf_cache.data.datasets import load_splits

    root0, run0 = full_run
    root, run = tmp_path / "videos", tmp_path / "run"
    shutil.copytree(root0, root)
    shutil.copytree(run0, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["full"]["root"] = str(root)
    (run / "config.json").write_text(json.dumps(cfg))
    test = load_splits("folder", None, root, 0)["test"]
    gone = root / f"{test.video_ids[0]}.mp4" if (root / f"{test.video_ids[0]}.mp4").exists() else \
        next(root.glob(f"{test.video_ids[0]}.*"))
    aside = tmp_path / gone.name
    gone.rename(aside)
    ev = lambda **kw: run_eval(EvalConfig(target=str(run), way=2, episodes=20, device="cpu", **kw), progress=False)  # noqa: E731
    first = ev()
    assert len(_test_videos(first["cache"])) == len(test) - 1
    aside.rename(gone)  # restored: the next eval extracts it into the same cache
    second = ev()
    assert second["cache"] == first["cache"] and len(_test_videos(second["cache"])) == len(test)
    # the eval cache damaged (a feature chunk garbled, the split's metadata garbled): eval repairs it itself
    cache = Path(second["cache"])
    chunk = next(f for f in sorted((cache / "test" / "features").rglob("*")) if f.is_file() and f.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    assert ev()["shots"]["1"] == second["shots"]["1"]
    (cache / "test" / "zarr.json").write_text("{")
    assert ev()["shots"]["1"] == second["shots"]["1"]
    # elsewhere (a run on read-only storage): --eval-cache
    other = ev(eval_cache=str(tmp_path / "ec"), out=str(tmp_path / "ev"))
    assert Path(other["cache"]).parent == tmp_path / "ec" and other["shots"]["1"] == second["shots"]["1"]
    # the tree moved: --root is used (and compared with the cache, not skipped)
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(DatasetError, match="is not a directory; pass --root"):
        ev()
    assert ev(root=str(moved))["shots"]["1"] == second["shots"]["1"]


def test_eval_cache_that_cannot_be_written_says_eval_cache(full_run, tmp_path, monkeypatch):
    root, run0 = full_run
    run = _copy(run0, tmp_path / "run")

    def read_only(self, *a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "touch", read_only)
    with pytest.raises(ConfigError, match=r"cannot write .*eval_cache \(Read-only file system\).*--eval-cache DIR"):
        run_eval(EvalConfig(target=str(run), way=2, episodes=10, device="cpu"), progress=False)


def test_a_damaged_backbone_is_named_and_resume_rebuilds_it(full_run, tmp_path, capsys, monkeypatch):
    root, run0 = full_run
    run = _copy(run0, tmp_path / "run")
    _truncate(run / "backbone.pt")
    code, err = _main(["eval", str(run), "--way", "2", "--episodes", "10", "--device", "cpu"], capsys, monkeypatch)
    _one_line(code, err, f"{run / 'backbone.pt'} is damaged", "--resume")
    assert "stopped between" not in err
    code, err = _main(_full_args(root, run, "--resume"), capsys, monkeypatch)  # finished; its only validation is the best
    assert code == 0, err
    a, b = torch.load(run0 / "backbone.pt", weights_only=True), torch.load(run / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run_eval(EvalConfig(target=str(run), way=2, episodes=10, device="cpu"), progress=False)["shots"]["1"]


def test_resume_of_a_full_run_from_a_moved_tree(full_run, tmp_path, capsys, monkeypatch):
    root0, run0 = full_run
    run = _copy(run0, tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(root0, moved)
    # another setting inside full: named
    code, err = _main(_full_args(moved, run, "--resume", "--episodes", "6", "--num-frames", "4"), capsys, monkeypatch)
    _one_line(code, err, "trained with different full.num_frames")
    # the same videos elsewhere: continued
    code, err = _main(_full_args(moved, run, "--resume", "--episodes", "6"), capsys, monkeypatch)
    assert code == 0, err
    assert torch.load(run / "last.pt", weights_only=False)["episodes"] == 6
    assert json.loads((run / "config.json").read_text())["full"]["root"] == str(moved)
    # other videos there (one train video gone): refused, naming the split
    from mdmf_cache.data.datasets import load_splits

    train = load_splits("folder", None, moved, 0)["train"]
    next(moved.glob(f"{train.video_ids[0]}.*")).unlink()
    code, err = _main(_full_args(moved, run, "--resume", "--episodes", "8"), capsys, monkeypatch)
    _one_line(code, err, "not those this run was trained on", "train: other videos (19 found now, 20 at training)")


def test_videos_shorter_than_t_frames_are_warned_about(action_videos, tmp_path, caplog):
    """action_videos have 20 frames: --num-frames 24 repeats frames, said once per split (extract and full mode)."""
    import logging

    from mdmf_cache.configs import ExtractConfig
    from pipelines.extract import run as extract

    ids = sorted(f"{p.parent.name}/{p.stem}" for p in action_videos.glob("*/*"))
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, part in (("train", ids[0:2]), ("val", ids[4:6]), ("test", ids[8:11])):
        (lists / f"{name}.txt").write_text("\n".join(part) + "\n")
    caplog.set_level(logging.WARNING)
    extract(ExtractConfig(dataset="folder", root=str(action_videos), splits_dir=str(lists), cache_dir=str(tmp_path / "c"),
                          model="mdmf-tiny-vit", pretrained=None, workers=0, progress=False, way=1, num_frames=24,
                          splits=("val", "test")))
    said = [r.getMessage() for r in caplog.records if "fewer than --num-frames 24" in r.getMessage()]
    assert sorted(said) == sorted(f"{s}: {n} of {n} videos have fewer than --num-frames 24 decodable frames: their frame "
                                  f"indices repeat (mdmf-cache info {tmp_path / 'c' / 'videos__mdmf-tiny-vit__random.zarr'}"
                                  " counts them)" for s, n in (("val", 2), ("test", 3)))
    caplog.clear()
    run_train(_full_cfg(action_videos, tmp_path / "run", episodes=4, val_every=2, full={"num_frames": 24}),
              progress=False)
    said = [r.getMessage() for r in caplog.records if "fewer than --num-frames 24" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("train: ") and "of the" in said[0]  # once each, not per validation
    assert said[1] == "val: 8 of 8 videos have fewer than --num-frames 24 decodable frames: their frames repeat"


# ----------------------------------------------------------------------------------------------- sweeps


_FINALIZER_CTRL_C = """
import sys
from mdmf_cache.process import keep_ctrl_c
if sys.argv[1] == "kept":
    keep_ctrl_c()
class Finalizer:
    def __del__(self):
        raise KeyboardInterrupt  # as a SIGINT landing while the garbage collector runs a callback
try:
    Finalizer()
    import time
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the interrupt comes from a helper thread, within milliseconds
        pass
except KeyboardInterrupt:
    print("interrupted")
else:
    print("lost")
"""


@pytest.mark.parametrize("mode", ["kept", "plain"])
def test_a_ctrl_c_swallowed_by_a_finalizer_still_interrupts_the_command(mode, monkeypatch):
    """A Ctrl-C raised inside a finalizer (as a SIGINT landing in a garbage-collector callback) still interrupts a
    command started by the console entry."""
    out = subprocess.run([sys.executable, "-c", _FINALIZER_CTRL_C, mode], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=60)
    # plain Python loses it (the premise): with the hook the interrupt is raised again outside the finalizer
    assert out.stdout.strip() == {"kept": "interrupted", "plain": "lost"}[mode], out.stderr
    if mode == "kept":  # and the console entry installs the hook before any command runs
        import atexit

        import mdmf_cache.process as process

        at_exit = []
        monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
        monkeypatch.setattr(cli, "app", lambda standalone_mode: 0)
        monkeypatch.setattr(atexit, "register", at_exit.append)
        cli.main()
        assert getattr(sys.unraisablehook, "keeps_ctrl_c", False)
        # and, at the process's exit, freezes what lives to the end out of the exit collections (~1 s of CPU)
        assert at_exit == [process._collect_then_freeze]


def test_ctrl_c_in_a_sweep_says_what_finished_and_resume_goes_on(tiny_cache, tmp_path):
    import optuna

    from mdmf_cache.sweeps.study import SweepConfig
    from pipelines.sweep import run as run_sweep

    out = tmp_path / "sw"
    trial = {"way": 2, "shot": 1, "train-queries": 1, "episodes": 8, "episodes-per-step": 4, "val-every": 4,
             "val-episodes": 4, "ffn-dim": 64}
    args = [str(tiny_cache), "--out", str(out), "--trials", "50", "--no-prune", "--space", "lr=1e-4:1e-2:log",
            *[x for k, v in trial.items() for x in (f"--{k}", str(v))]]
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "sweep", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{out / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = 0
    deadline = time.monotonic() + 240
    while finished < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            finished = sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="sw", storage=storage).trials)
        except Exception:  # noqa: BLE001 - not created yet
            continue
    assert proc.poll() is None and finished >= 2, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    done = sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="sw", storage=storage).trials)
    assert f"interrupted: {done} of 50 trials finished" in err and "rerun the same command with --resume" in err, err
    cfg = SweepConfig(cache=str(tiny_cache), out=str(out), trials=done + 1, prune=False, space={"lr": "1e-4:1e-2:log"},
                      fixed=trial, resume=True)
    run_sweep(cfg, progress=False)
    states = [t.state.name for t in optuna.load_study(study_name="sw", storage=storage).trials]
    assert states.count("COMPLETE") == done + 1


def test_ctrl_c_as_a_trials_heartbeat_starts_leaves_no_thread_behind(tiny_cache, tmp_path, monkeypatch):
    """Optuna's heartbeat thread is not a daemon: a Ctrl-C while it starts, before its ``with`` block is entered,
    left it beating and the interrupted `mdmf-cache sweep` never exited (seen once in the Ctrl-C test above)."""
    import threading

    from optuna.storages._heartbeat import HeartbeatThread

    from mdmf_cache.sweeps.study import SweepConfig
    from pipelines.sweep import run as run_sweep

    real_start = HeartbeatThread.start

    def start_then_ctrl_c(self):
        real_start(self)
        raise KeyboardInterrupt

    def beating():
        return [t for t in threading.enumerate() if getattr(t, "_target", None) is HeartbeatThread._record_heartbeat]

    monkeypatch.setattr(HeartbeatThread, "start", start_then_ctrl_c)
    cfg = SweepConfig(cache=str(tiny_cache), out=str(tmp_path / "sw"), trials=2, prune=False, heartbeat=1,
                      space={"lr": "1e-4:1e-2:log"}, fixed={"way": 2, "shot": 1, "episodes": 4, "val-every": 4})
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg, progress=False)
        assert beating() == []
    finally:  # without the fix: stop it here, or this test process would never exit
        for t in beating():
            t._args[2].set()
            t.join()
