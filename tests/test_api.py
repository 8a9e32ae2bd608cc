"""The Python API: the session in docs/python-api.md runs as written, and its defaults are the CLI's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from conftest import REPO


def _blocks() -> list[str]:
    text = (REPO / "docs" / "python-api.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.integration
def test_the_documented_session_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 4
    scope: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/python-api.md block {i + 1}", "exec"), scope)  # noqa: S102 - our own docs
    assert (tmp_path / "api_demo" / "runs" / "mdmf" / "best.pt").is_file()
    assert scope["logits"].shape == (4, 5, 5)
    assert (tmp_path / "api_demo" / "compare" / "table.md").is_file()
    assert len(scope["labels"]["rows"]) == 3 and (tmp_path / "api_demo" / "predict" / "predictions.csv").is_file()


def test_api_defaults_are_the_configs_and_the_cli_s():
    import mdmf_cache as mc
    from mdmf_cache.configs import TrainConfig
    import cli

    with pytest.raises(TypeError, match="no field"):
        mc.train(cache="x", episodez=3)
    # the CLI's train defaults are TrainConfig's (full mode's learning rate included: 1e-5 in both)
    import inspect

    sig = inspect.signature(cli.train)
    for name in ("way", "shot", "episodes", "episodes_per_step", "val_every", "val_episodes", "save_every", "seed"):
        assert sig.parameters[name].default == getattr(TrainConfig, name), name
    assert TrainConfig(mode="full").lr == 1e-5 and TrainConfig().lr == 1e-4
    assert sig.parameters["lr"].default is None  # so the config decides, per mode
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"train_shot", "train_queries", "preset", "method"} <= fields


def test_the_api_takes_natural_python_types(demo_cache, tmp_path, monkeypatch):
    """A Path where a config holds a str, a comma string, a list or one value where it holds a tuple, a whole float
    for an int; anything else of the wrong type is a ConfigError naming the argument, raised before any work."""
    import mdmf_cache as mc
    import mdmf_cache.api as api
    from mdmf_cache.errors import ConfigError
    from pipelines import compare as compare_recipe, train as train_recipe

    seen = {}
    monkeypatch.setattr(train_recipe, "run", lambda cfg, **kw: (seen.__setitem__("train", cfg), {"run": "x"})[1])
    monkeypatch.setattr(compare_recipe, "run", lambda cfg, **kw: seen.__setitem__("compare", cfg))
    monkeypatch.setattr(api, "load_run", lambda path: path)
    mc.train(cache=Path(demo_cache), out=tmp_path / "r", shot=5.0)
    assert seen["train"].cache == str(demo_cache) and seen["train"].out == str(tmp_path / "r")
    assert seen["train"].shot == 5 and isinstance(seen["train"].shot, int)
    mc.compare(cache=demo_cache, methods="mdmf, protonet", shots=5)
    assert seen["compare"].methods == ("mdmf", "protonet") and seen["compare"].shots == (5,)
    mc.compare(cache=demo_cache, methods=["mdmf"], shots=[1, 5], reference="mdmf")
    assert seen["compare"].methods == ("mdmf",) and seen["compare"].shots == (1, 5)
    for bad, name in ((dict(shot=1.5), "shot"), (dict(lr="fast"), "lr"), (dict(resume="yes"), "resume")):
        with pytest.raises(ConfigError, match=rf"^{name}="):
            mc.train(cache=demo_cache, out=tmp_path / "bad", **bad)
    split = mc.load_split(demo_cache, "test")
    with pytest.raises(ConfigError, match="episodes=0: must be >= 1"):
        mc.episode_list(split, episodes=0)
    assert len(mc.episode_list(split, shot=1.0, episodes=3)) == 3
    assert not (tmp_path / "bad").exists()
    from pipelines import sweep as sweep_recipe

    monkeypatch.setattr(sweep_recipe, "run", lambda cfg, **kw: seen.__setitem__("sweep", cfg))
    mc.sweep(cache=demo_cache, out=tmp_path / "sw", space="lr=1e-4:1e-2:log,dropout=0:0.5")  # the --space text
    assert seen["sweep"].space == {"lr": "1e-4:1e-2:log", "dropout": "0:0.5"}
    with pytest.raises(ConfigError, match=r"^space=3: a dict"):
        mc.sweep(cache=demo_cache, out=tmp_path / "sw", space=3)
