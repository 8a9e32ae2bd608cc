"""Full mode: CLIP fine-tuned end to end with the heads, from the videos, on one or several processes.

Tiny open_clip models with a seeded random init, synthetic videos, CPU. What is checked: the backbone
learns and moves (the text tower does not), every head trains in full mode, a SIGKILLed run resumed equals an
uninterrupted one,
two gloo processes compute the gradient of one process, ``eval`` of a full-mode run (re-extraction
with ``backbone.pt``) equals scoring in memory, and bad input fails before any work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import forked

from mdmf_cache.errors import ConfigError
from mdmf_cache.configs import TrainConfig
from pipelines.train import run as run_train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

#: Timing fields of metrics.jsonl (everything else must match between runs).
TIMING = ("episodes_per_s", "loader_wait_s", "decode_s_per_episode")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _full(root, **kw) -> dict:
    return {"dataset": "folder", "root": str(root), "model": "mdmf-tiny-vit", "pretrained": None, "workers": 0,
            "flip": False, **kw}


def _small_args(root, out, model="mdmf-tiny-vit", **kw) -> list[str]:
    """CLI arguments of a 2-way 1-shot run on ``action_videos`` (5/2/2 classes of 4 videos)."""
    args = {"--root": root, "--model": model, "--pretrained": "none", "--device": "cpu", "--way": 2, "--shot": 1,
            "--train-queries": 1, "--val-episodes": 6, "--workers": 0, "--out": out, **kw}
    return ["train", "--mode", "full", "folder", *[str(x) for kv in args.items() for x in kv]]


def _cli_in_process(args: list[str]) -> None:
    """``mdmf-cache ARGS`` in this process (the same code path as the subprocess, without its start-up)."""
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, (r.output, r.exception)


def _forked_cli(args: list[str], before=None):
    """``mdmf-cache ARGS`` in a forked child (conftest's :func:`forked`: one torch thread there), ``before()`` first."""

    def child() -> None:
        if before is not None:
            before()
        _cli_in_process(args)

    return forked(child)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(demo_videos, tmp_path_factory):
    """A short full-mode run on the demo videos (5-way 1-shot, tiny ViT, 4 frames per video); read-only."""
    out = tmp_path_factory.mktemp("full") / "run"
    cfg = TrainConfig(mode="full", out=str(out), way=5, shot=1, train_queries=1, episodes=32, episodes_per_step=8,
                      val_every=16, val_episodes=100, lr=1e-3, device="cpu",
                      full=_full(demo_videos, episodes_per_forward=8, num_frames=4))
    return cfg, run_train(cfg, progress=False)


def test_full_mode_fine_tunes_the_backbone_and_learns(full_run, demo_videos):
    from mdmf_cache.clip.backbone import load_backbone
    from mdmf_cache.distributed import World
    from mdmf_cache.heads.factory import build_model
    from mdmf_cache.evaluation.scoring import validate
    from mdmf_cache.training.data import FullData

    cfg, res = full_run
    out = Path(cfg.out)
    assert res["episodes"] == 32 and {"backbone.pt", "best.pt", "last.pt", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    lines = _metrics(out)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert all(line["substituted_videos"] == 0 for line in lines)
    # the untrained model (same seed, same backbone) on the same val episodes
    data = FullData(cfg, torch.device("cpu"), World())
    torch.manual_seed(cfg.seed)
    untrained = data.wrap(build_model(cfg.preset, data.dim, data.num_frames, {}, "mdmf"))
    from mdmf_cache.data.episodes import Episodes

    val_eps = Episodes.load(out / "val_episodes.npz")
    before = validate(untrained.head, data.val_split(untrained), val_eps, cfg.seed)
    assert res["best_val"] > before + 3, (before, res["best_val"])
    # the visual tower moved, the text tower did not
    start = load_backbone("mdmf-tiny-vit", None, "cpu").model.state_dict()
    tuned = torch.load(out / "backbone.pt", weights_only=True)
    assert set(tuned) == set(start)
    moved = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert moved and all(k.startswith("visual.") for k in moved)
    assert any(k.startswith("visual.transformer") for k in moved)


def test_eval_of_a_full_run_reextracts_with_its_backbone(full_run, demo_videos, tmp_path):
    from mdmf_cache.clip.backbone import Backbone, load_backbone
    from mdmf_cache.data.datasets import load_splits
    from mdmf_cache.evaluation.scoring import score
    from mdmf_cache.clip.finetune import FrameEncoder
    from mdmf_cache.configs import EvalConfig
    from mdmf_cache.evaluation.scoring import episode_list
    from pipelines.evaluate import run as run_eval
    from mdmf_cache.extraction.embed import embed_split, find_videos, prompts_for
    from mdmf_cache.heads.factory import load_head

    cfg, _ = full_run
    out = Path(cfg.out)
    res = run_eval(EvalConfig(target=str(out), way=5, episodes=200, device="cpu"), progress=False)
    caches = list((out / "eval_cache").glob("*.zarr"))
    assert len(caches) == 1 and res["cache"] == str(caches[0])
    # in memory: the test split embedded by the fine-tuned encoder (the validation path), the same heads and episodes
    ecfg = cfg.full_mode.extract_config(cfg.preset, cfg.seed, "cpu", splits=("test",))
    test = load_splits("folder", None, demo_videos, cfg.seed)["test"]
    find_videos(ecfg, {"test": test})
    bb = load_backbone("mdmf-tiny-vit", str(out / "backbone.pt"), "cpu")
    encoder = FrameEncoder(bb.model).eval()
    split = embed_split(test, ecfg, Backbone(encoder.clip, bb.tokenizer, bb.dim, bb.device, "x", "x"),
                        bb.encode_texts(prompts_for(test, ecfg)))
    head, _ = load_head(out, "cpu")
    eps = episode_list(split, 5, 1, 1, 200, 0)
    mem = score("mdmf", split, eps, head, 0).summary()
    # the cache's rows and the in-memory ones are encoded in other batches (to a float16 step): one query at most
    assert res["shots"]["1"]["accuracy"] == pytest.approx(mem["accuracy"], abs=100 / 1000 + 1e-9)  # 200 x 5 queries
    # a second eval reuses the cache: no feature chunk is written again
    chunks = lambda: {f: f.stat().st_mtime_ns for f in (caches[0] / "test" / "features").rglob("*")  # noqa: E731
                      if f.is_file() and f.name != "zarr.json"}
    before = chunks()
    again = run_eval(EvalConfig(target=str(out), way=5, episodes=200, device="cpu"), progress=False)
    assert again["shots"]["1"]["accuracy"] == res["shots"]["1"]["accuracy"]
    assert before and chunks() == before
    # a moved video tree: --root points eval's extraction at it
    from mdmf_cache.errors import DatasetError

    with pytest.raises(DatasetError, match="nowhere"):
        run_eval(EvalConfig(target=str(out), way=5, episodes=20, device="cpu", split="val",
                            root=str(tmp_path / "nowhere")), progress=False)


def test_resume_after_sigkill_equals_uninterrupted(action_videos, tmp_path):
    common = {"--episodes": 8, "--episodes-per-step": 2, "--val-every": 4, "--save-every": 2, "--lr": "1e-3",
              "--model": "mdmf-tiny-rn", "--num-frames": 4}
    whole, cut, held = tmp_path / "whole", tmp_path / "cut", tmp_path / "held"

    def hold_after_the_save_at_6() -> None:  # in the child: the kill lands right after that save, every time
        from mdmf_cache.training.loop import Checkpoints

        save = Checkpoints.save_last

        def save_then_hold(self) -> None:
            save(self)
            if self.state.done == 6:
                held.touch()
                time.sleep(600)

        Checkpoints.save_last = save_then_hold

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed child's one thread (_forked_cli): the three runs reduce in the same order
    try:
        _cli_in_process(_small_args(action_videos, whole, **common))  # uninterrupted
        # the same command in another process, killed right after a save between two validations (episode 6: the
        # loss parts since the validation at 4 travel in last.pt), then resumed
        proc = _forked_cli(_small_args(action_videos, cut, **common), before=hold_after_the_save_at_6)
        deadline = time.monotonic() + 300
        while not held.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL
        proc.join(60)
        done = torch.load(cut / "last.pt", weights_only=False)["episodes"]
        assert 6 <= done < 8, "the kill came too late to test a resume"
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        _cli_in_process([*_small_args(action_videos, cut, **common), "--resume"])
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(p / "last.pt", weights_only=False) for p in (whole, cut))
    assert a["episodes"] == b["episodes"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    assert _metrics(whole) == _metrics(cut)


def test_two_gloo_processes_equal_one(action_videos, tmp_path):
    """One update of 4 episodes: rank 0 takes episodes 0-1, rank 1 episodes 2-3. The tiny RN's per-episode
    BatchNorm and the heads' LTCE BatchNorm exercise the running-statistics merge; validation, the split
    embedding."""
    common = {"--episodes": 4, "--episodes-per-step": 4, "--val-every": 4, "--lr": "1e-4", "--model": "mdmf-tiny-rn",
              "--val-episodes": 40, "--num-frames": 4}
    one, two = tmp_path / "one", tmp_path / "two"
    # one thread, as torchrun gives each of its processes: this tiny random ResNet is sensitive to the order of
    # float32 reductions (2 threads vs 1 move its gradient by ~1e-3 relative)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _cli_in_process(_small_args(action_videos, one, **common))
    finally:
        torch.set_num_threads(threads)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "cli", *_small_args(action_videos, two, **common)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(p / "last.pt", weights_only=False) for p in (one, two))
    # the gradient (Adam's first moment after one step is 0.1 g), equal up to float32 reduction order
    for i, st in a["optimizer"]["state"].items():
        g1, g2 = st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5 * max(g1.abs().max().item(), 1.0)), i
    stats = [k for k in a["model"] if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.startswith("encoder.") for k in stats) and any(k.startswith("head.") for k in stats)
    for k in stats:
        assert torch.allclose(a["model"][k].double(), b["model"][k].double(), atol=1e-5), k
    ma, mb = _metrics(one), _metrics(two)
    assert ma[0]["loss"] == pytest.approx(mb[0]["loss"], rel=1e-5)
    # validation: each rank embedded half of the val videos, gathered on rank 0
    # (each rank's share is encoded in other batches: a float16 step may flip a near-tie, one query at most)
    assert ma[0]["val_acc"] == pytest.approx(mb[0]["val_acc"], abs=100 / 12 + 1e-9)  # 6 episodes x 2 queries
    # without the merge, rank 1's two episodes would be missing from the running statistics
    assert int(b["model"]["head.views.ltc.extractor.net.2.num_batches_tracked"]) == 4


def test_a_torchrun_launched_single_process_joins_a_group_and_equals_a_plain_one(action_videos, tmp_path, monkeypatch):
    """torchrun with one process (a 1-GPU job) runs under DDP with a process group (gloo here, NCCL on a GPU):
    the same weights and statistics as a process that was not launched."""
    import socket

    import pipelines.train as training

    common = {"--episodes": 2, "--episodes-per-step": 2, "--val-every": 2, "--lr": "1e-4", "--model": "mdmf-tiny-rn",
              "--val-episodes": 6, "--num-frames": 4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    joined = []
    real = training.init_process_group
    monkeypatch.setattr(training, "init_process_group", lambda world, device: joined.append(world.distributed)
                        or real(world, device))
    try:
        _cli_in_process(_small_args(action_videos, tmp_path / "plain", **common))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(key, value)
        _cli_in_process(_small_args(action_videos, tmp_path / "launched", **common))
    finally:
        torch.set_num_threads(threads)
    assert joined == [False, True]  # the launched process joined a process group
    a, b = (torch.load(tmp_path / p / "last.pt", weights_only=False)["model"] for p in ("plain", "launched"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_fails_before_any_work(action_videos, demo_cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli

    # the console entry: one line, exit 2
    r = subprocess.run([sys.executable, "-m", "cli", "train", "--mode", "full", str(demo_cache), "--root",
                        str(action_videos), "--out", str(tmp_path / "a")], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "is a cache" in r.stderr and "--mode fast" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3 and "Traceback" not in r.stderr  # one line, wrapped at most
    runner = CliRunner()
    r = runner.invoke(cli.app, ["train", str(demo_cache), "--root", str(action_videos), "--out", str(tmp_path / "b")])
    said = " ".join(r.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert r.exit_code == 2 and "--root" in said and "for --mode full" in said
    # 2-way 2-shot with 3 queries needs 5 videos per class; the classes have 4: named
    r = runner.invoke(cli.app, _small_args(action_videos, tmp_path / "c", **{"--shot": 2, "--train-queries": 3}))
    assert isinstance(r.exception, ConfigError)
    assert "5 videos per class" in str(r.exception) and "moving" in str(r.exception)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        run_train(TrainConfig(mode="full", out=str(tmp_path / "d"), full=_full(action_videos)), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_out_of_gpu_memory_names_the_flags_that_help(action_videos, tmp_path, monkeypatch):
    from mdmf_cache.clip.endtoend import EndToEnd

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(EndToEnd, "forward", oom)
    cfg = TrainConfig(mode="full", out=str(tmp_path / "r"), way=2, shot=1, train_queries=1, episodes=2,
                      episodes_per_step=2, device="cpu", full=_full(action_videos))
    with pytest.raises(ConfigError, match="--grad-checkpointing.*--episodes-per-forward"):
        run_train(cfg, progress=False)


def test_episodes_are_a_function_of_seed_and_index(action_videos):
    """Any worker, rank or resumed run decodes the same episode i: classes, videos, frames, crops and PPS draws."""
    from mdmf_cache.data.datasets import load_splits, resolve_paths
    from mdmf_cache.data.video_episodes import EpisodeVideos

    train = load_splits("folder", None, action_videos)["train"]
    resolve_paths(train, action_videos)
    _, paths, labels = train.found()
    make = lambda: EpisodeVideos(paths, labels, len(train.classes), 3, 1, 1, seed=5)  # noqa: E731
    a, b = make()[17], make()[17]
    assert np.array_equal(a["classes"], b["classes"]) and np.array_equal(a["noise"], b["noise"])
    assert all(torch.equal(x, y) for x, y in zip(a["frames"], b["frames"])) and a["crops"] == b["crops"]
    c = make()[18]
    assert not (np.array_equal(a["classes"], c["classes"]) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a["frames"], c["frames"])))
    assert len(a["frames"]) == 6 and a["frames"][0].shape[0] == 8 and a["errors"] == []


@pytest.mark.parametrize("full, method, expect", [
    ({"train_text": True}, "mdmf", "visual+text"),
    ({"model": "mdmf-tiny-rn", "train_last_blocks": 1, "backbone_bn": "frozen", "grad_checkpointing": True},
     "mdmf", "last block"),
    ({"train_last_blocks": 0, "episodes_per_forward": 2}, "clip-fsar", "frozen"),
])
def test_backbone_switches_train_what_they_say(action_videos, tmp_path, full, method, expect):
    from mdmf_cache.clip.backbone import load_backbone

    cfg = TrainConfig(mode="full", out=str(tmp_path / "r"), method=method, way=2, shot=1, train_queries=1, episodes=4,
                      episodes_per_step=2, val_every=4, val_episodes=4, lr=1e-3, device="cpu",
                      full=_full(action_videos, num_frames=4, **full))
    run_train(cfg, progress=False)
    start = load_backbone(cfg.full_mode.model, None, "cpu").model.state_dict()
    tuned = torch.load(tmp_path / "r" / "backbone.pt", weights_only=True)
    moved = {k for k in start if not torch.equal(start[k], tuned[k])}
    if expect == "visual+text":  # --train-text: both towers move (logit_scale never does)
        assert any(k.startswith("visual.") for k in moved) and any(k.startswith("transformer.") for k in moved)
        assert "logit_scale" not in moved
    elif expect == "last block":  # the last bottleneck and the attention pool only; frozen BatchNorm statistics
        assert moved and all(k.startswith(("visual.layer4.0.", "visual.attnpool.")) for k in moved), sorted(moved)
        assert not any("running_" in k for k in moved)
    else:  # --freeze-backbone: the backbone is the initial one, the heads trained (CLIP-FSAR's text-loss scale included)
        assert not moved
        head = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
        assert head["method"] == "clip-fsar" and "scale" in head["model"]
        assert float(head["model"]["scale"]) != 1.0  # the video-text loss reached it


def test_demo_full_adds_a_full_mode_row(demo_videos, demo_cache, tmp_path):
    """``mdmf-cache demo --full`` (shortened): a full-mode stage after the fast one, both beside the baselines on
    the same test episodes. The demo's videos and cache are the session fixtures' (same settings)."""
    import shutil

    from pipelines.demo import DemoConfig, run as run_demo

    out = tmp_path / "demo"
    shutil.copytree(demo_videos, out / "videos")
    (out / "videos" / ".complete").write_text("ok\n")
    shutil.copytree(demo_cache, out / "cache" / demo_cache.name)
    res = run_demo(DemoConfig(out=str(out), workers=0, train_episodes=32, eval_episodes=50, shots=(1,), full=True,
                              full_episodes=8))  # one update of the demo's 8 episodes, one validation
    rows = {r["method"]: r for r in res["eval"]}
    assert list(rows) == ["mdmf (fast)", "mdmf (full)", "protonet", "otam", "zero-shot"]
    assert res["train_full"]["episodes"] == 8 and (out / "runs" / "demo_full" / "backbone.pt").is_file()
    # the full row scores the full run's heads on its test split re-extracted with its backbone
    scored = json.loads((out / "eval" / "mdmf-full" / "results.json").read_text())
    assert Path(scored["target"]) == out / "runs" / "demo_full" and "eval_cache" in scored["cache"]
    assert json.loads((out / "demo_results.json").read_text())["eval"][1]["method"] == "mdmf (full)"


def test_init_heads_starts_from_a_fast_mode_run(demo_videos, demo_cache, tmp_path):
    """Linear probe, then fine-tune: a fast-mode run on the backbone's cache gives full mode its starting heads."""
    fast = tmp_path / "fast"
    run_train(TrainConfig(cache=str(demo_cache), out=str(fast), shot=1, train_queries=1, episodes=16,
                          episodes_per_step=8, val_every=16, val_episodes=20, lr=1e-3), progress=False)
    cfg = TrainConfig(mode="full", out=str(tmp_path / "full"), shot=1, train_queries=1, episodes=2, episodes_per_step=2,
                      val_every=2, val_episodes=20, lr=1e-12, device="cpu",
                      full=_full(demo_videos, clean_names=True, init_heads=str(fast)))
    run_train(cfg, progress=False)
    a = torch.load(fast / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "full" / "best.pt", weights_only=False)["model"]
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 10 and all(torch.allclose(a[k], b[k], atol=1e-6) for k in params)  # lr 1e-12: the loaded heads
    cfg.out, cfg.method = str(tmp_path / "fsar"), "clip-fsar"
    with pytest.raises(ConfigError, match="heads differ"):
        run_train(cfg, progress=False)
    assert not (tmp_path / "fsar").exists()


def test_an_undecodable_video_is_replaced_by_another_of_its_class(action_videos, tmp_path):
    import shutil

    from mdmf_cache.data.datasets import load_splits, resolve_paths
    from mdmf_cache.data.video_episodes import EpisodeVideos

    root = tmp_path / "videos"
    shutil.copytree(action_videos, root)
    train = load_splits("folder", None, root)["train"]
    resolve_paths(train, root)
    _, paths, labels = train.found()
    eps = EpisodeVideos(paths, labels, len(train.classes), 2, 1, 1, seed=0)
    ep, _ = eps.plan(3)
    broken = paths[ep.support[0, 0]]
    broken.write_bytes(b"not a video")
    item = eps[3]
    assert len(item["errors"]) == 1 and str(broken) in item["errors"][0]
    assert len(item["frames"]) == 4 and item["frames"][0].shape[0] == 8  # the episode is whole


@pytest.mark.parametrize("method", ["otam", "tsn"])
def test_a_head_without_parameters_fine_tunes_the_backbone(action_videos, tmp_path, method):
    """OTAM and TSN have no parameters: fast mode refuses them; full mode fine-tunes CLIP through their loss (the
    optimiser holds backbone parameters only), and ``eval`` of that run scores the head on re-extracted features."""
    from mdmf_cache.clip.backbone import load_backbone
    from mdmf_cache.configs import EvalConfig
    from pipelines.evaluate import run as run_eval

    with pytest.raises(ConfigError, match="no trainable parameters"):
        TrainConfig(cache="x.zarr", out=str(tmp_path / "fast"), method=method).validate()
    cfg = TrainConfig(mode="full", out=str(tmp_path / "r"), method=method, way=2, shot=1, train_queries=1, episodes=4,
                      episodes_per_step=2, val_every=4, val_episodes=4, lr=1e-3, device="cpu",
                      full=_full(action_videos, num_frames=4))
    run_train(cfg, progress=False)
    start = load_backbone(cfg.full_mode.model, None, "cpu").model.state_dict()
    tuned = torch.load(tmp_path / "r" / "backbone.pt", weights_only=True)
    assert any(k.startswith("visual.") and not torch.equal(start[k], tuned[k]) for k in start)
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert [len(g["params"]) for g in last["optimizer"]["param_groups"]][0] == 0  # the head's group is empty
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert best["method"] == method and not best["model"]
    if method == "otam":
        res = run_eval(EvalConfig(target=str(tmp_path / "r"), shots=(1,), way=2, episodes=10), progress=False)
        assert res["method"] == "otam" and "eval_cache" in res["cache"] and res["shots"]["1"]["episodes"] == 10


@pytest.mark.parametrize("method", ["cpm2c", "clip-mei", "mpl", "team", "chamfer"])
def test_the_newer_heads_train_in_full_mode(action_videos, tmp_path, method):
    """Each head added after MDMF and CLIP-FSAR trains with CLIP fine-tuned from the videos (2-way 1-shot, 4 episodes
    of 4 frames: a few seconds each): most of its parameters move from the untrained copy the same seed builds (a few
    get no gradient from 1-shot episodes), the visual tower moves; ``eval`` of a transductive head's run scores it with
    its released test queries per class and marks it."""
    from mdmf_cache import heads
    from mdmf_cache.clip.backbone import load_backbone
    from mdmf_cache.configs import EvalConfig
    from mdmf_cache.heads.factory import head_from_record
    from pipelines.evaluate import run as run_eval

    cfg = TrainConfig(mode="full", out=str(tmp_path / "r"), method=method, way=2, shot=1, train_queries=1, episodes=4,
                      episodes_per_step=2, val_every=4, val_episodes=4, lr=1e-3, device="cpu",
                      full=_full(action_videos, num_frames=4))
    res = run_train(cfg, progress=False)
    assert res["episodes"] == 4 and all(np.isfinite(line["loss"]) for line in _metrics(tmp_path / "r"))
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert best["method"] == method
    torch.manual_seed(cfg.seed)  # the heads' initialisation, as the trainer does it
    untrained = head_from_record(best)
    params = dict(untrained.named_parameters())
    moved = [k for k, p in params.items() if not torch.equal(p.detach(), best["model"][k])]
    assert len(moved) >= len(params) / 2, (len(moved), len(params))
    start = load_backbone(cfg.full_mode.model, None, "cpu").model.state_dict()
    tuned = torch.load(tmp_path / "r" / "backbone.pt", weights_only=True)
    assert any(k.startswith("visual.") and not torch.equal(start[k], tuned[k]) for k in start)
    spec = heads.get(method)
    if spec.transductive:
        ev = run_eval(EvalConfig(target=str(tmp_path / "r"), way=2, episodes=10), progress=False)
        assert ev["transductive"] and ev["queries_per_class"] == {"1": spec.test_queries(1)}
        assert "eval_cache" in ev["cache"] and ev["shots"]["1"]["episodes"] == 10
