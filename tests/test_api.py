"""The Python API: the session in docs/python-api.md runs as written, and its defaults are the CLI's."""

from __future__ import annotations

import dataclasses
import re

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
