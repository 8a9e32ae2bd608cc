"""The typer CLI: help, extract -> info -> export, refused settings, and the console entry's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli
from mdmf_cache.errors import CacheError, DatasetError

BIN = Path(sys.executable).parent / "mdmf-cache"


def _flat(text: str) -> str:
    return " ".join(text.split())


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = [str(BIN)] if BIN.is_file() else [sys.executable, "-c", "import cli; cli.main()"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def test_help_lists_commands(cli_runner):
    res = cli_runner.invoke(cli.app, ["--help"])
    assert res.exit_code == 0
    for command in ("extract", "info", "export", "demo", "train", "eval"):
        assert command in res.output
    res = cli_runner.invoke(cli.app, ["extract", "--help"])
    assert res.exit_code == 0 and "--train-views" in res.output and "--strict" in res.output


def test_help_does_not_import_torch():
    code = ("import sys, cli\n"
            "from typer.testing import CliRunner\n"
            "for args in (['--help'], ['extract', '--help'], ['info', '--help']):\n"
            "    assert CliRunner().invoke(cli.app, args).exit_code == 0, args\n"
            "heavy = [m for m in ('torch', 'open_clip', 'zarr', 'av', 'decord') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_extract_help_reads_right(cli_runner):
    res = cli_runner.invoke(cli.app, ["extract", "--help"], env={"COLUMNS": "250"})
    out = _flat(res.output)
    assert "underscores to spaces, drop [brackets]." in out  # not eaten by the help markup
    assert "torchrun --nproc-per-node 4 -m cli extract ssv2-full" in out  # the form the README uses
    assert "--labels" in out


@pytest.mark.integration
def test_extract_info_export(cli_runner, action_videos, tiny_cache, tmp_path, same_cache):
    cache_dir = tmp_path / "cache"
    args = ["extract", "folder", "--root", str(action_videos), "--cache-dir", str(cache_dir), "--model", "mdmf-tiny-vit",
            "--pretrained", "none", "--workers", "0", "--chunk-rows", "4", "--train-views", "2", "--no-flip"]
    res = cli_runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    path = cache_dir / "videos__mdmf-tiny-vit__random.zarr"
    assert "extracted into" in res.output and path.is_dir()
    same_cache(path, tiny_cache)  # the CLI's defaults (paper preset: tsn, CLIP mean/std) = the library's

    res = cli_runner.invoke(cli.app, ["info", str(path)])
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "┃ train ┃ val ┃ test ┃" in out  # fields down, splits across: reads in 80 columns
    assert "videos on disk │ 20 │ 8 │ 8 │" in out and "done │ 20/20 │ 8/8 │ 8/8 │" in out
    assert "features N,V,T,D │ 20,2,8,64 │ 8,1,8,64 │ 8,1,8,64 │" in out
    assert max(len(line) for line in res.output.splitlines() if not line.startswith("cache: ")) <= 80
    assert "complete: yes" in out and '"num_frames": 8' in out

    # the rerun options reach the config (saved in the cache); nothing to extract
    res = cli_runner.invoke(cli.app, args + ["--verify-deep", "--retry-failed"])
    assert res.exit_code == 0, res.output
    from mdmf_cache.store.cache import CacheStore

    config = CacheStore(path).root.attrs["config"]
    assert config["verify_deep"] is True and config["retry_failed"] is True

    # other settings: refused, the differing field named
    res = cli_runner.invoke(cli.app, args + ["--num-frames", "4"])
    assert res.exit_code != 0 and isinstance(res.exception, CacheError)
    assert "num_frames: cache has 8, asked 4" in str(res.exception)

    h5 = tmp_path / "out.h5"
    res = cli_runner.invoke(cli.app, ["export", str(path), "--format", "h5", str(h5)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    import h5py

    g = CacheStore(path).root["train"]
    root_attrs = dict(CacheStore(path).root.attrs)
    with h5py.File(h5, "r") as f:
        assert set(f.keys()) == {"train", "val", "test"}
        # every root attribute travels: config and ready included
        assert {k: json.loads(v) for k, v in f.attrs.items()} == root_attrs
        assert json.loads(f.attrs["config"])["train_views"] == 2 and json.loads(f.attrs["ready"]) is True
        assert np.array_equal(f["train"]["features"][()], g["features"][:])
        assert np.array_equal(f["train"]["text_features"][()], g["text_features"][:])


@pytest.mark.integration
def test_missing_video_warning_is_shown(cli_runner, action_videos, tmp_path):
    """The project's warnings reach the terminal (open_clip's root-logger chatter does not)."""
    ids = sorted(p.parent.name + "/" + p.stem for p in action_videos.glob("*/*"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(f"{ids[0]}\n{ids[0].split('/')[0]}/vanished\n")
    (lists / "val.txt").write_text(ids[4] + "\n")
    (lists / "test.txt").write_text(ids[8] + "\n")
    res = cli_runner.invoke(cli.app, ["extract", "folder", "--root", str(action_videos), "--splits", str(lists),
                                      "--cache-dir", str(tmp_path / "c"), "--model", "mdmf-tiny-vit",
                                      "--pretrained", "none", "--workers", "0"])
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "1 videos listed in the split files are not under" in out
    assert "No pretrained weights" not in out


def test_full_mode_of_a_builtin_dataset_reads_the_shipped_splits(cli_runner, tmp_path, monkeypatch):
    """No --splits, run from an unrelated folder: the package's lists are read and the videos looked for."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(tmp_path)
    res = cli_runner.invoke(cli.app, ["train", "--mode", "full", "ucf101", "--root", str(empty), "--out",
                                      str(tmp_path / "run"), "--device", "cpu"])
    assert isinstance(res.exception, DatasetError), res.output
    assert str(res.exception).startswith(f"none of the {9154 + 1421} videos of the split files is under {empty}")
    assert not (tmp_path / "run").exists()


def test_console_entry_errors_are_one_line(tmp_path):
    res = _run("extract", "folder", "--root", str(tmp_path), "--sampler", "bogus")  # our own check
    assert res.returncode == 2
    assert res.stderr.strip() == "error: bad options: --sampler 'bogus' (choose tsn, linspace)"
    assert "Traceback" not in res.stderr + res.stdout

    res = _run("extract", "folder", "--workers", "lots")  # click's parameter check
    assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout
    assert "Invalid value for '--workers'" in res.stderr

    for c in ("a", "b", "c"):  # --root one level above the class folders: nothing found, said in one line
        (tmp_path / "data" / "videos" / c).mkdir(parents=True)
        (tmp_path / "data" / "videos" / c / "v.mp4").write_bytes(b"")
    res = _run("extract", "folder", "--root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: no videos under") and f"try --root {tmp_path / 'data' / 'videos'}" in res.stderr
    assert not (tmp_path / "cache").exists()

    res = _run("info", str(tmp_path / "none.zarr"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: no cache at") and len(res.stderr.strip().splitlines()) == 1


def test_sweep_and_compare_options_reach_their_configs(cli_runner, monkeypatch):
    """``sweep --no-share-features`` and ``compare --sweep N`` land in the configs the recipes get."""
    import pipelines.compare
    import pipelines.sweep

    got = {}

    def stop(name):
        def record(cfg, *a, **k):
            got[name] = cfg
            raise SystemExit(0)
        return record

    monkeypatch.setattr(pipelines.sweep, "run", stop("sweep"))
    monkeypatch.setattr(pipelines.compare, "run", stop("compare"))
    args = ["sweep", "c.zarr", "--jobs", "3", "--no-share-features", "--episodes", "50"]
    assert cli_runner.invoke(cli.app, args).exit_code == 0
    assert (got["sweep"].jobs, got["sweep"].share_features, got["sweep"].fixed) == (3, False, {"episodes": 50})
    assert cli_runner.invoke(cli.app, ["sweep", "c.zarr"]).exit_code == 0 and got["sweep"].share_features is True
    assert cli_runner.invoke(cli.app, ["compare", "c.zarr", "--sweep", "20", "--shot", "1,5"]).exit_code == 0
    assert (got["compare"].sweep, got["compare"].shots) == (20, (1, 5))
    assert (got["compare"].seeds, got["compare"].test_selected) == (1, False)
    assert cli_runner.invoke(cli.app, ["compare", "c.zarr", "--seeds", "3", "--test-selected"]).exit_code == 0
    assert (got["compare"].seeds, got["compare"].test_selected) == (3, True)
    res = cli_runner.invoke(cli.app, ["compare", "c.zarr", "--methods", " , "])  # not "every head"
    assert res.exit_code == 2 and "name at least one method" in res.output


def test_heads_marks_the_transductive_and_token_heads(cli_runner):
    """``mdmf-cache heads`` has a transductive column and a reads column (features, or the --tokens SPEC), one mark per
    head as its SPEC says; ``heads NAME`` says it and the released test queries per class eval scores it with."""
    from mdmf_cache import heads

    res = cli_runner.invoke(cli.app, ["heads"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "transductive" in line)
    col = [c.strip() for c in header.split("┃")].index("transductive")
    rows = {cells[1].strip(): cells[col].strip() for cells in (line.split("│") for line in res.output.splitlines())
            if len(cells) > col and cells[1].strip() in heads.METHODS}
    assert rows == {m: "yes" if heads.get(m).transductive else "no" for m in heads.METHODS}
    col = [c.strip() for c in header.split("┃")].index("reads")
    reads = {cells[1]: cells[col] for line in res.output.splitlines()
             if (cells := [c.strip() for c in line.split("│")]) and len(cells) > col and cells[1] in heads.METHODS}
    assert reads == {m: f"tokens {heads.get(m).tokens}" if heads.get(m).tokens else "features" for m in heads.METHODS}
    assert reads["emp-net"] == "tokens 4,8,12"
    assert rows["clip-mei"] == rows["mpl"] == "yes" and rows["mdmf"] == "no"
    res = cli_runner.invoke(cli.app, ["heads", "clip-mei"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "transductive: a query's logits depend on the other queries" in _flat(res.output)
    assert "released test queries per class (1 at K=1, 1 at K=5)" in _flat(res.output)
    res = cli_runner.invoke(cli.app, ["heads", "trx"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "not transductive" in _flat(res.output)
