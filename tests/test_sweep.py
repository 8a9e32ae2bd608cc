"""Sweeps on Optuna: options from the dataclasses, SQLite study with resume and pruning, the best config
retrained through ``train --config``, bad input, a SIGKILLed worker, two workers on a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import forked, join_or_kill

import cli
from mdmf_cache.errors import ConfigError
from mdmf_cache.sweeps.space import parse_fixed, parse_space, parse_space_text, sweep_options, trial_config
from mdmf_cache.sweeps.study import SweepConfig
from pipelines.sweep import run as run_sweep

# Tiny trials on the 2-way tiny cache: two optimiser steps, a validation after each.
TRIAL = {"way": 2, "shot": 1, "train-queries": 1, "episodes": 8, "episodes-per-step": 4, "val-every": 4,
         "val-episodes": 4, "ffn-dim": 64}


def _args(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


TRIAL_ARGS = _args(TRIAL)


def _study(storage: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


def _states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def _cli_main(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """The console entry in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mdmf-cache", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _fork_cli(*args: str):
    """``mdmf-cache sweep ARGS`` (the console entry) in a forked child (conftest's :func:`forked`), to be SIGKILLed;
    its --jobs workers are spawned fresh as ever. Its stderr and theirs are this process's (capfd)."""

    def child() -> None:
        sys.argv = ["mdmf-cache", "sweep", *args]
        cli.main()

    return forked(child, daemon=False)  # not a daemon: --jobs starts workers


# ------------------------------------------------------------------------------------ options and space


def test_options_come_from_the_dataclasses():
    from mdmf_cache.heads.mdmf_config import MDMFConfig
    from mdmf_cache.configs import TrainConfig

    opts = sweep_options()
    targets = {t for o in opts.values() for t in o.targets}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"cache", "out", "heads", "resume", "full"}
    head_fields = {f"heads.{f.name}" for f in dataclasses.fields(MDMFConfig)} - {"heads.dim", "heads.num_frames"}
    assert train_fields | head_fields == targets  # every field is reachable, nothing else
    # the names of `train`
    assert opts["lambda"].targets == ("heads.lam",) and "lam" not in opts
    assert opts["dropout"].targets == ("heads.mmfe_dropout", "heads.ffn_dropout", "heads.tcn_dropout")
    assert opts["view"].choices == ("both", "ltc", "gtc", "ntc")
    fixed = parse_fixed(["--episodes", "2e3", "--no-pps", "--lambda=0.5", "--otam-one-way", "--view", "gtc",
                         "--text-pos", "1"])
    assert fixed == {"episodes": 2000, "pps": False, "lambda": 0.5, "otam-one-way": True, "view": "gtc", "text-pos": 1}
    tcfg = trial_config(dataclasses.asdict(TrainConfig()), {**fixed, "dropout": 0.3}, opts)
    assert tcfg.episodes == 2000
    assert tcfg.heads == {"pps": False, "lam": 0.5, "otam_bidirectional": False, "views": "gtc", "text_pos": 1,
                          "mmfe_dropout": 0.3, "ffn_dropout": 0.3, "tcn_dropout": 0.3}
    with pytest.raises(ConfigError, match="did you mean lr"):
        parse_fixed(["--lrr", "1e-3"])
    with pytest.raises(ConfigError, match="choose from"):
        parse_fixed(["--view", "xyz"])


def test_space_syntax():
    dims = {d.name: d for d in parse_space(parse_space_text(
        "lr=1e-5:1e-2:log, lambda=0.1:2,episodes-per-step=8|16,episodes=100:1000,pps=true|false"))}
    assert (dims["lr"].kind, dims["lr"].log, dims["lr"].low, dims["lr"].high) == ("float", True, 1e-5, 1e-2)
    assert (dims["lambda"].kind, dims["lambda"].log) == ("float", False)
    assert dims["episodes-per-step"].values == (8, 16) and dims["episodes"].kind == "int"
    assert dims["pps"].values == (True, False)
    for bad, msg in [("lrate=1e-5:1e-2", "unknown parameter 'lrate'"), ("lr=1e-2:1e-5", "LOW must be below HIGH"),
                     ("lr=0:1e-2:log", "log range needs LOW > 0"), ("episodes=10.5:20", "integer"),
                     ("view=0:1", "listed values"), ("lr=1e-5", "LOW:HIGH"), ("lr=a:b", "numbers")]:
        with pytest.raises(ConfigError, match=msg):
            parse_space(parse_space_text(bad))


# ----------------------------------------------------------------------------------------- SQLite sweep


@pytest.mark.integration
def test_sqlite_sweep_resume_prunes_and_best_config_reproduces(tiny_cache, tmp_path, cli_runner, monkeypatch, capsys):
    out = tmp_path / "sweep"
    cfg = SweepConfig(cache=str(tiny_cache), out=str(out), trials=3, space={"lr": "1e-4:1e-1:log", "lambda": "0.1:2"},
                      fixed=dict(TRIAL), prune=False, seed=3)
    res = run_sweep(cfg, progress=False)
    study = _study(cfg.storage_url, "sweep")
    assert _states(study) == ["COMPLETE"] * 3
    # never the test split: trials only score the fixed val list
    for t in study.get_trials():
        run = Path(t.user_attrs["config"]["out"])
        assert (run / "val_episodes.npz").is_file() and not any(run.glob("*test*"))
        assert not (run / "last.pt").exists() and (run / "best.pt").is_file()
    # the same command again is refused; --resume with other settings too
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(cfg, progress=False)
    other = dataclasses.replace(cfg, resume=True, fixed={**TRIAL, "episodes": 12})
    with pytest.raises(ConfigError, match="different fixed"):
        run_sweep(other, progress=False)
    # resume to 5 with pruning forced (every validation is below 101%): two more trials, each pruned at
    # its first validation
    res = run_sweep(dataclasses.replace(cfg, resume=True, trials=5, prune=True, prune_below=101.0), progress=False)
    study = _study(cfg.storage_url, "sweep")
    states = [t.state.name for t in study.get_trials() if not t.user_attrs.get("skipped")]
    assert states == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    for t in study.get_trials():
        if t.state.name == "PRUNED":
            assert list(t.intermediate_values) == [4]  # stopped at the first validation
            lines = (Path(t.user_attrs["config"]["out"]) / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == 1  # the run's metrics stop where it was stopped
    # tables, best config and figures
    best = max((t for t in study.get_trials() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    saved = json.loads((out / "best.json").read_text())
    assert saved["sweep"]["trial"] == best.number and saved["lr"] == pytest.approx(best.params["lr"])
    assert saved["heads"]["lam"] == pytest.approx(best.params["lambda"]) and saved["episodes"] == 8
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(study.get_trials()) and csv_lines[1].startswith(f"{best.number},COMPLETE,")
    assert "| trial | state | val % | lr | lambda |" in (out / "trials.md").read_text()
    for name in ("history.png", "importances.png", "params.png"):
        assert (out / name).stat().st_size > 1000, name
    assert {Path(p).name for p in res["figures"]} == {"history.png", "importances.png", "params.png"}
    # sweep show rewrites them from the study alone
    (out / "trials.md").unlink()
    (out / "history.png").unlink()
    assert cli_runner.invoke(cli.app, ["sweep", "show", str(out)]).exit_code == 0
    assert (out / "trials.md").is_file() and (out / "history.png").is_file()
    # train --config best.json reproduces the best trial's val accuracy (CLI options override the file)
    code, err = _cli_main(["train", "--config", str(out / "best.json"), "--out", str(tmp_path / "best_run"),
                           "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    metrics = [json.loads(x) for x in (tmp_path / "best_run" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["val_acc"] for m in metrics) == pytest.approx(best.value, abs=1e-9)
    assert (tmp_path / "best_run" / "curves.png").is_file()


@pytest.mark.integration
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_cache, tmp_path, cli_runner, monkeypatch, capsys):
    import zarr

    out = tmp_path / "sw"
    base = [str(tiny_cache), "--out", str(out), *TRIAL_ARGS]
    cases = [
        (["--space", "lrx=1e-5:1e-2"], "unknown parameter 'lrx'"),
        (["--space", "lr=1e-2:1e-5"], "LOW must be below HIGH"),
        (["--space", "dropout=0:1"], "dropout"),  # 1.0 is not a valid dropout: caught before any trial
        (["--space", "lr=1e-5:1e-2", "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the study storage"),
        (["--bogus", "3"], "unknown option"),
    ]
    for extra, msg in cases:
        code, err = _cli_main(["sweep", *base, *extra], capsys, monkeypatch)
        assert code == 2, (extra, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists(), extra
    # a cache that is not complete
    broken = tmp_path / "broken.zarr"
    import shutil

    shutil.copytree(tiny_cache, broken)
    g = zarr.open_group(str(broken), mode="r+")
    done = g["val"]["done"]
    done[0] = False
    code, err = _cli_main(["sweep", str(broken), "--out", str(out), *TRIAL_ARGS], capsys, monkeypatch)
    assert code == 2 and "not complete" in err and not out.exists(), err


def test_python_api_sweep_takes_the_config_fields(tiny_cache, tmp_path):
    import mdmf_cache as mc

    with pytest.raises(TypeError, match="no field"):
        mc.sweep(cache=str(tiny_cache), trialz=2)
    out = tmp_path / "api"
    # field names with "_" as Python spells them, "-" as the CLI does
    fixed = {k.replace("-", "_"): v for k, v in TRIAL.items()}
    res = mc.sweep(cache=str(tiny_cache), out=str(out), trials=2, prune=False, space={"lr": "1e-4:1e-2:log"},
                   fixed=fixed)
    assert [r["state"] for r in res["rows"]] == ["COMPLETE"] * 2
    best = max(res["rows"], key=lambda r: r["value"])
    assert res["best"]["trial"] == best["number"] and res["best"]["run"] == best["run"]
    saved = json.loads((out / "best.json").read_text())
    assert saved["episodes_per_step"] == TRIAL["episodes-per-step"] and saved["lr"] == best["params"]["lr"]


# -------------------------------------------------------------------------------------- crash safety


@pytest.mark.integration
def test_sigkilled_worker_then_resume_ends_with_exactly_the_trials(tiny_cache, tmp_path, capfd):
    out = tmp_path / "killed"
    slow = {**TRIAL, "episodes": 60, "val-every": 20}  # long enough to be killed between validations
    args = [str(tiny_cache), "--out", str(out), "--trials", "2", "--heartbeat", "1", "--no-prune",
            "--space", "lr=1e-4:1e-2:log", *_args(slow)]
    proc = _fork_cli(*args)
    storage = f"sqlite:///{out / 'study.db'}"
    killed = None
    study = None  # loaded once (a load costs ~60 ms, a look at its trials ~2 ms): the looks leave the CPU to the worker
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.is_alive():
            time.sleep(0.1)
            if not (out / "study.db").is_file():
                continue
            try:
                study = study or _study(storage, "killed")
                running = [t for t in study.get_trials() if t.state.name == "RUNNING"]
            except Exception:  # noqa: BLE001 - the study is being created
                continue
            if running and (out / "trials" / f"{running[0].number:05d}" / "metrics.jsonl").is_file():
                killed = running[0]
                proc.kill()  # SIGKILL mid-trial: validated at least once, not finished
                break
    finally:
        join_or_kill(proc, 0)  # killed or not, it goes now
    assert killed is not None, f"no trial was seen running: {capfd.readouterr().err[-2000:]}"
    assert proc.exitcode == -signal.SIGKILL
    assert _states(_study(storage, "killed"))[killed.number] == "RUNNING"  # what the dead worker left
    cfg = SweepConfig(cache=str(tiny_cache), out=str(out), trials=2, heartbeat=1, prune=False,
                      space={"lr": "1e-4:1e-2:log"}, fixed=slow, resume=True)
    run_sweep(cfg, progress=False)
    trials = _study(storage, "killed").get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states, states
    assert trials[killed.number].state.name == "FAIL"  # marked failed by the heartbeat...
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"  # ...and resumed once, with its params
    assert retried[0].params == killed.params
    others = [t for t in trials if t.state.name == "COMPLETE" and t is not retried[0]]
    assert all(t.params != killed.params for t in others)  # the resumed sampler does not redraw old points


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Running (a zombie left for its new parent to reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the processes from /proc")
def test_a_sigkilled_jobs_sweep_takes_its_workers_with_it(tiny_cache, tmp_path, capfd):
    """kill -9 of a --jobs sweep (a scheduler, the OOM killer): its workers stop within seconds, finish no new
    trial, and give back the trials they were running (failed and requeued with their parameters)."""
    import optuna

    out = tmp_path / "orphans"
    slow = {**TRIAL, "episodes": 60, "val-every": 20}  # trials long enough to be killed inside
    args = [str(tiny_cache), "--out", str(out), "--trials", "40", "--jobs", "2", "--no-prune",
            "--space", "lr=1e-4:1e-2:log", *_args(slow)]
    proc = _fork_cli(*args)
    storage = f"sqlite:///{out / 'study.db'}"
    kids: list[int] = []
    try:
        deadline = time.time() + 120
        running: list = []
        study = None  # loaded once: the looks at its trials leave the CPU to the workers
        while time.time() < deadline and proc.is_alive():  # until both workers are inside a trial
            time.sleep(0.1)
            try:
                study = study or _study(storage, "orphans")
                trials = study.get_trials()
            except Exception:  # noqa: BLE001 - the study is being created
                continue
            running = [t for t in trials if t.state.name == "RUNNING"]
            if len(running) == 2 and (out / "trials" / f"{running[0].number:05d}" / "metrics.jsonl").is_file():
                break
        assert len(running) == 2 and proc.is_alive(), capfd.readouterr().err[-2000:]
        kids = _children(proc.pid)  # the two workers and multiprocessing's resource tracker
        done_before = {t.number for t in trials if t.state.name in ("COMPLETE", "PRUNED")}
        proc.kill()  # SIGKILL
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL and len(kids) >= 2, (proc.exitcode, kids)
        deadline = time.time() + 30  # a generous wait: they stop within a second or two
        while time.time() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.2)
        assert not any(_alive(k) for k in kids), [k for k in kids if _alive(k)]
        err = capfd.readouterr().err
        assert err.count("is gone (killed?): this worker stops") == 2, err[-3000:]
        trials = _study(storage, "orphans").get_trials()
        states = [t.state.name for t in trials]
        assert "RUNNING" not in states, states  # nothing left for a heartbeat to find
        done_after = {t.number for t in trials if t.state.name in ("COMPLETE", "PRUNED")}
        # no trial was finished after the kill, but one that was ending as it came
        assert done_after - done_before <= {t.number for t in running}, (done_before, done_after, states)
        given_back = {t.system_attrs["failed_trial"]: t for t in trials if t.state.name == "WAITING"}
        assert given_back, states
        for number, retry in given_back.items():
            assert trials[number].state.name == "FAIL" and retry.params == trials[number].params
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    finally:
        join_or_kill(proc, 0)
        for k in kids:  # the orphans, were they still alive
            if _alive(k):
                os.kill(k, signal.SIGKILL)


def test_a_killed_worker_is_named_and_fails_the_sweep_only_when_its_study_is_short(tmp_path, caplog):
    """A worker killed by a signal (by hand, the OOM killer) while the other finished every trial: a warning and a
    finished sweep, not "stopped with an error (see above); fix it"; with trials missing, one line naming the
    signal and --resume."""
    import optuna

    from mdmf_cache.sweeps.workers import _check_exits

    cfg = SweepConfig(cache="c.zarr", out=str(tmp_path / "sw"), trials=2)
    (tmp_path / "sw").mkdir()
    study = optuna.create_study(study_name="sw", storage=cfg.storage_url, direction="maximize")
    study.add_trial(optuna.create_trial(value=1.0))
    with pytest.raises(ConfigError, match=r"^sweep worker 0 was killed by SIGKILL .*; 1 of 2 trials finished; rerun "
                                          r"the same command with --resume"):
        _check_exits(cfg, [-9, 0])
    study.add_trial(optuna.create_trial(value=2.0))
    with caplog.at_level("WARNING"):
        _check_exits(cfg, [-9, 0])
    assert "sweep worker 0 was killed by SIGKILL" in caplog.text and "finished the study's 2 trials" in caplog.text
    _check_exits(cfg, [0, 0])
    with pytest.raises(ConfigError, match="stopped with an error"):  # a traceback above: a real error
        _check_exits(cfg, [0, 1])


# ---------------------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (run as the ``postgres`` user when we are root)."""
    import pwd
    import shutil
    import socket
    import tempfile

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql to run this test")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the PostgreSQL driver psycopg is not installed (pip install 'psycopg[binary]')")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mdmf-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        runuser = shutil.which("runuser")
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if not runuser:
            pytest.skip("running as root without runuser to start the server as 'postgres'")
        os.chown(base, pg.pw_uid, pg.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "--no-instructions")
        run(pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr or e.stdout}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.integration
def test_workers_on_postgresql_run_disjoint_trials(tiny_cache, tmp_path, postgres_url, cli_runner, capfd,
                                                   monkeypatch):  # cli_runner: removes the CLI's log handler after
    """The same line started twice at once (two machines), one of them with --jobs 2: three workers, one study.
    The --jobs 2 line runs in a forked child (:func:`_fork_cli`), the other in this process (the console entry called
    here), joining as soon as the --jobs 2 sweep's workers run a trial, so that all three race for the trials left."""
    trials = 5
    line = [str(tiny_cache), "--study", "pg", "--storage", postgres_url, "--out", str(tmp_path / "pg"),
            "--trials", str(trials), "--no-prune", "--space", "lr=1e-4:1e-2:log,lambda=0.1:2", *TRIAL_ARGS]
    proc = _fork_cli(*line, "--jobs", "2")
    try:
        deadline = time.time() + 120
        study = None  # loaded once: the looks at its trials leave the CPU to the workers
        while time.time() < deadline and proc.is_alive():  # until its workers are in the study
            time.sleep(0.1)
            try:
                study = study or _study(postgres_url, "pg")
                if "RUNNING" in _states(study):
                    break
            except Exception:  # noqa: BLE001 - the study is being created
                continue
        code, err = _cli_main(["sweep", *line], capfd, monkeypatch)
    finally:
        exitcode = join_or_kill(proc, 240)
    assert code == 0, err
    assert exitcode == 0, (exitcode, capfd.readouterr().err[-3000:])
    study = _study(postgres_url, "pg")
    real = [t for t in study.get_trials() if not t.user_attrs.get("skipped")]
    assert [t.state.name for t in real] == ["COMPLETE"] * trials  # none lost, none beyond --trials
    runs = [t.user_attrs["config"]["out"] for t in real]
    for r in runs:  # each trial trained once: one metrics line per validation, not two runs' worth
        lines = (Path(r) / "metrics.jsonl").read_text().splitlines()
        assert (Path(r) / "best.pt").is_file() and len(lines) == TRIAL["episodes"] // TRIAL["val-every"]
    assert len({tuple(sorted(t.params.items())) for t in real}) == trials  # the workers sampled apart
    workers = {t.user_attrs["worker"] for t in real}
    assert workers and all(w.rsplit(":", 1)[1].isdigit() for w in workers)
    assert (tmp_path / "pg" / "best.json").is_file() and (tmp_path / "pg" / "trials.csv").is_file()


def test_a_tuple_option_parses_from_the_command_line() -> None:
    """TRX's ``cardinalities`` from ``--head-opt cardinalities=2,3`` (or a sweep's fixed value) is a tuple of ints."""
    opt = sweep_options("trx")["cardinalities"]
    assert opt.parse("2,3") == (2, 3) and opt.parse("(1, 4)") == (1, 4) and opt.parse((2,)) == (2,)
    with pytest.raises(ConfigError, match="comma-separated integers"):
        opt.parse("2,x")


def test_a_schema_being_created_by_another_process_is_waited_for(tmp_path, monkeypatch):
    """Two processes opening a new SQLite study at once: the one that loses the race to create the tables gets
    "table ... already exists" (an OperationalError there, an IntegrityError or ProgrammingError elsewhere) and
    opens the storage on its next try; any other OperationalError is a one-line ConfigError at once."""
    import optuna.storages
    from sqlalchemy.exc import OperationalError

    import mdmf_cache.sweeps.study as sweeps

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE study_directions", {}, Exception("table study_directions already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(sweeps.time, "sleep", lambda s: None)
    cfg = SweepConfig(cache=str(tmp_path / "c.zarr"), out=str(tmp_path / "sw"))
    (tmp_path / "sw").mkdir()
    assert isinstance(sweeps.open_storage(cfg), real) and len(calls) == 2

    def broken(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(ConfigError, match="cannot open the study storage .*disk I/O error"):
        sweeps.open_storage(cfg)


def test_a_ctrl_c_inside_optunas_bookkeeping_is_still_a_ctrl_c(tiny_cache, tmp_path, monkeypatch):
    """A Ctrl-C that lands while Optuna records a trial leaves Optuna's ``finally`` reading a name it never set: an
    UnboundLocalError with the KeyboardInterrupt as its context. The sweep raises the KeyboardInterrupt itself (the
    CLI then exits 130 saying what finished), not the library error; other errors pass as they are."""
    import optuna

    import mdmf_cache.sweeps.workers as workers

    def tell():  # what optuna.study._optimize._run_trial does when the interrupt comes inside its try
        try:
            raise KeyboardInterrupt
            state = 1
        finally:
            print(state)  # noqa: F821

    def bookkeeping_interrupted(self, *args, **kwargs):
        tell()

    cfg = SweepConfig(cache=str(tiny_cache), out=str(tmp_path / "sw"), trials=2, prune=False,
                      space={"lr": "1e-4:1e-2:log"}, fixed=dict(TRIAL, device="cpu"))
    monkeypatch.setattr(optuna.study.Study, "optimize", bookkeeping_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, progress=False)
    try:
        tell()
    except UnboundLocalError as e:
        assert isinstance(workers._interrupt_behind(e), KeyboardInterrupt)
    assert workers._interrupt_behind(ValueError("other")) is None
