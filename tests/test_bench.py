"""Every benchmark script in bench/ still runs: ``bench/X.py --quick`` as a script (``__main__``, its own
``sys.argv``), all of them in one fresh process started once (a process each would spend most of the time
importing torch), from an empty working folder.

The list is the files in bench/, so a new benchmark is picked up without touching this file. Each must take
``--quick`` (tiny sizes, the same code paths as its measured run), exit 0, and print last one JSON line
holding the keys it promises in its module-level ``KEYS`` tuple, with ``bench`` its own name and ``quick``
true, after a human-readable table. Nothing here is timed: --quick runs measure nothing.

A bench with a test file of its own (``tests/test_bench_<name>.py``, e.g. ``bench/scale.py``'s, which checks its
figures) is left to that file: running it twice would only cost time.

``bench/gpu.py`` needs a CUDA device: without one it must stop at its device check (exit status 3, after
its imports and its argument parsing), which is what is checked on a CPU machine, and its own parts run in their
tiny CPU version (``--allow-cpu``) in the same process.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py"))
#: Benches whose own test file runs them (tests/test_bench_<stem>.py).
OWN_TEST = {b for b in BENCHES if (REPO / "tests" / f"test_bench_{Path(b).stem}.py").is_file()}


def promised_keys(path: Path) -> tuple[str, ...]:
    """The script's ``KEYS = (...)`` (read from its source: importing it would run its imports here)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "KEYS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    pytest.fail(f"bench/{path.name} defines no KEYS tuple (the keys its JSON line promises)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_benches_are_found():
    assert {"extract.py", "train_fast.py", "gpu.py"} <= set(BENCHES) - OWN_TEST


DRIVER = r"""
import contextlib, faulthandler, io, json, logging, os, runpy, sys, traceback
results, folder = {}, sys.argv[1]
PER_BENCH_S = 300  # a bench that hangs prints every thread's stack and ends the run, naming itself, long before 900 s
# extract.py sets OpenMP's wait policy before torch loads (as mdmf-cache extract): it runs first
names = sorted(sys.argv[2:], key=lambda n: n != "extract.py")
threads = None
for name in names:  # "X.py" runs with --quick; "X.py ARGS..." with those arguments instead
    out, err, code = io.StringIO(), io.StringIO(), 0
    script, *args = name.split()
    sys.argv = [os.path.join(folder, script), *(args or ["--quick"])]
    saved_path = list(sys.path)
    print(f"bench/{' '.join([script, *(args or ['--quick'])])}", file=sys.__stderr__, flush=True)
    faulthandler.dump_traceback_later(PER_BENCH_S, exit=True, file=sys.__stderr__)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    faulthandler.cancel_dump_traceback_later()
    sys.path[:] = saved_path  # what a bench put on it for its own imports goes with it
    logging.disable(logging.NOTSET)
    import torch
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


#: gpu.py's own parts in their tiny CPU version (test_gpu_bench_parts_run_on_a_cpu), run by the same driver.
GPU_ON_CPU = "gpu.py --allow-cpu --parts fast_train,eval_10k"


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict:
    """Every bench's ``--quick`` run, and gpu.py's CPU parts without a GPU: ``{name: {code, stdout, stderr, cwd}}``."""
    cwd = tmp_path_factory.mktemp("bench_cwd")
    names = sorted(set(BENCHES) - OWN_TEST) + ([] if _cuda() else [GPU_ON_CPU])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-c", DRIVER, str(REPO / "bench"), *names], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "cwd": cwd}


@pytest.mark.parametrize("name", sorted(set(BENCHES) - OWN_TEST))
def test_bench_runs_quick(name, quick_runs):
    path = REPO / "bench" / name
    keys = promised_keys(path)
    r = quick_runs[name]
    if "unrecognized arguments: --quick" in r["stderr"]:
        pytest.fail(f"bench/{name} has no --quick mode (tiny sizes, the same code paths, seconds)")
    if name == "gpu.py" and not _cuda():
        assert r["code"] == 3, (r["code"], r["stderr"][-3000:])
        assert "imports and arguments OK; no CUDA device" in r["stderr"], r["stderr"][-3000:]
        assert "Traceback" not in r["stderr"]
        return
    assert r["code"] == 0, r["stderr"][-3000:]
    lines = r["stdout"].strip().splitlines()
    assert len(lines) >= 2, f"bench/{name} printed no table before its JSON line: {r['stdout']!r}"
    record = json.loads(lines[-1])
    missing = [k for k in keys if k not in record]
    assert not missing, f"bench/{name}'s JSON line lacks {missing}: {lines[-1][:500]}"
    assert record["bench"] == path.stem and record["quick"] is True
    cwd = quick_runs["cwd"]
    assert not list(cwd.iterdir()), f"a bench wrote into the working directory: {list(cwd.iterdir())}"


@pytest.mark.skipif("_cuda()", reason="with a GPU, test_bench_runs_quick runs gpu.py itself")
def test_gpu_bench_parts_run_on_a_cpu(quick_runs):
    """gpu.py's own parts (bf16 against float32 training, the 10,000-episode timing) in their tiny CPU version.
    The other parts run code the other benches' quick runs cover (extract.py, random_pixel_updates, cli train).
    On a CPU both "precisions" are float32 (heads_autocast is a no-op there), so the two runs, from the same
    initialisation on the same episodes, must end with the same val accuracy."""
    r = quick_runs[GPU_ON_CPU]
    assert r["code"] == 0, r["stderr"][-3000:]
    record = json.loads(r["stdout"].strip().splitlines()[-1])
    assert record["errors"] == [] and record["quick"] is True, record
    fast = record["fast_train"]
    assert fast["bf16"]["val_acc"] == fast["float32"]["val_acc"] == fast["bf16"]["val_acc_cpu_float32"]
    assert fast["val_acc_diff_cpu_float32"] == 0
    assert record["eval_10k"]["same_predictions"] and record["eval_10k"]["episodes"] == 20
    assert not list(quick_runs["cwd"].iterdir())
