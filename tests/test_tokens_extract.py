"""``extract --tokens SPEC``: the backbone's token layers against a re-derivation through open_clip's modules, a
cache extended with tokens in place against one extracted with them from the start, SIGKILL and resume of an
extension, damaged token chunks found and repaired, a rerun without --tokens, and one-line refusals."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_features

from mdmf_cache.configs import ExtractConfig
from mdmf_cache.errors import CacheError, ConfigError
from mdmf_cache.extraction.build import run_extract
from mdmf_cache.store.cache import CacheStore

SPEC = "1,2,3"  # every block of mdmf-tiny-vit3, as EMP-Net's 4,8,12 of ViT-B/16; block 3 is the last
ARRAYS = ("tokens_1", "tokens_2", "tokens_3")
# T = 4 and chunks of 2 rows keep it small; the folder split of 5 classes x 2 videos gives 6/2/2 videos
SETTINGS = dict(dataset="folder", model="mdmf-tiny-vit3", pretrained=None, workers=0, progress=False, chunk_rows=2,
                train_views=2, flip=False, num_frames=4, way=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from mdmf_cache.data.synthetic import make_action_dataset

    base = tmp_path_factory.mktemp("token_videos")
    make_action_dataset(base / "videos", num_classes=5, videos_per_class=2, num_frames=12, size=(64, 48))
    return base / "videos"


def _extract(root: Path, cache_dir: Path, **kw):
    path, results = run_extract(ExtractConfig(**{**SETTINGS, "root": str(root), "cache_dir": str(cache_dir), **kw}))
    return path, {r.split: r for r in results}


@pytest.fixture(scope="module")
def plain(videos, tmp_path_factory) -> Path:
    """A finished cache of ``videos`` without tokens (read-only: copy it)."""
    return _extract(videos, tmp_path_factory.mktemp("plain"))[0]


@pytest.fixture(scope="module")
def tokened(videos, tmp_path_factory) -> Path:
    """The same videos extracted with ``--tokens 1,2,3`` from the start (read-only)."""
    return _extract(videos, tmp_path_factory.mktemp("tokened"), tokens=SPEC)[0]


def _copy(cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cache" / cache.name
    shutil.copytree(cache, dst)
    return dst


def _files(cache: Path, skip_tokens: bool = True) -> dict[str, tuple[bytes, int]]:
    """Every file of a cache but the token arrays' and the metadata the run updates: bytes and mtime."""
    out = {}
    for f in sorted(cache.rglob("*")):
        rel = f.relative_to(cache).as_posix()
        if f.is_file() and f.name != "zarr.json" and not (skip_tokens and "/tokens_" in f"/{rel}"):
            out[rel] = (f.read_bytes(), f.stat().st_mtime_ns)
    return out


def _arrays(cache: Path, split: str) -> dict[str, np.ndarray]:
    g = CacheStore(cache).root[split]
    return {name: np.asarray(g[name][:]) for name in g.array_keys()}


# ---- (a) the backbone -------------------------------------------------------------------------------
def test_vit_and_rn_tokens_equal_a_rederivation_through_open_clip_modules():
    """ViT blocks through ln_post and proj, the class token of the last against the pooled embedding, RN's layer4
    map, pooled grids against F.adaptive_avg_pool2d, and the pooled embeddings bit for bit encode_images'."""
    import torch
    import torch.nn.functional as F

    from mdmf_cache.clip.backbone import load_backbone, token_info

    torch.manual_seed(0)
    pix = torch.randn(3, 3, 224, 224)  # (B, 3, H, W)
    bb = load_backbone("mdmf-tiny-vit3", None, "cpu")
    pooled, tokens = bb.encode_with_tokens(pix, SPEC)
    assert torch.equal(pooled, bb.encode_images(pix))  # the same forward: the same bits
    v = bb.model.visual
    with torch.no_grad():  # open_clip's ViT written out: patches, class token, positions, ln_pre, blocks
        x = v.conv1(pix).flatten(2).transpose(1, 2)  # (B, h*w, W)
        x = torch.cat([v.class_embedding.expand(len(pix), 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        ref = []
        for block in v.transformer.resblocks:  # batch first
            x = block(x)
            ref.append(v.ln_post(x) @ v.proj)  # (B, 1 + h*w, D)
    assert len(tokens) == 3 and tokens[0].shape == (3, 50, 32)
    for got, want in zip(tokens, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tokens[0], tokens[2], atol=1e-2)  # three different layers
    # open_clip pools the ViT by its class token: block 3's class token after ln_post and proj is the embedding
    torch.testing.assert_close(tokens[2][:, 0], pooled, rtol=1e-5, atol=1e-6)
    # a pooled grid: the class token kept, the 7x7 patches adaptive-average-pooled
    _, grid = bb.encode_with_tokens(pix, "1,3@3x2")
    for got, full in zip(grid, (tokens[0], tokens[2])):
        want = F.adaptive_avg_pool2d(full[:, 1:].transpose(1, 2).reshape(3, 32, 7, 7), (3, 2)).flatten(2).transpose(1, 2)
        assert got.shape == (3, 7, 32)
        torch.testing.assert_close(got[:, 0], full[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(got[:, 1:], want, rtol=1e-5, atol=1e-6)

    rn = load_backbone("mdmf-tiny-rn", None, "cpu")
    pooled, (fmap,) = rn.encode_with_tokens(pix, "map")
    assert torch.equal(pooled, rn.encode_images(pix))
    r = rn.model.visual
    with torch.no_grad():
        stage = r.layer4(r.layer3(r.layer2(r.layer1(r.stem(pix)))))  # (B, C, h, w), before attnpool
    assert fmap.shape == (3, 49, 256)
    torch.testing.assert_close(fmap, stage.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    _, (small,) = rn.encode_with_tokens(pix, "map@2x2")
    torch.testing.assert_close(small, F.adaptive_avg_pool2d(stage, 2).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)

    # what the config says (no weights) is what the built towers give; the real backbones' shapes
    for b, spec in ((bb, SPEC), (bb, "last@3x2"), (rn, "map")):
        assert token_info(b.name, spec) == b.token_info(spec)
    vit_b = token_info("ViT-B-16", "4,8,12")
    assert (vit_b.grid, vit_b.cls, vit_b.dim, vit_b.patches) == ((14, 14), True, 512, 197)
    rn50 = token_info("RN50", "map")
    assert (rn50.grid, rn50.cls, rn50.dim, rn50.patches) == ((7, 7), False, 2048, 49)


# ---- (b) a finished cache extended in place ----------------------------------------------------------
def test_a_cache_extended_with_tokens_equals_one_extracted_with_them(plain, tokened, videos, tmp_path):
    """Bit for bit on every array (the extension encodes the same batches); the features' files untouched; a
    second run does nothing; info describes each token array."""
    from mdmf_cache.report.tables import print_info

    cache = _copy(plain, tmp_path)
    before = _files(cache)
    path, res = _extract(videos, cache.parent, tokens=SPEC)
    assert path == cache
    assert {s: (r.tokens, r.extracted) for s, r in res.items()} == {"train": (6, 0), "val": (2, 0), "test": (2, 0)}
    assert _files(cache) == before  # features, done, flags: not one byte or mtime changed
    store = CacheStore(cache)
    for split in ("train", "val", "test"):
        a, b = _arrays(cache, split), _arrays(tokened, split)
        assert set(a) == set(b) and set(ARRAYS) | {"tokens_done"} <= set(a)
        for name in a:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, (split, name)
            assert np.array_equal(a[name], b[name]) if a[name].dtype.kind not in "OUT" else \
                a[name].tolist() == b[name].tolist(), (split, name)
        views = 2 if split == "train" else 1
        assert a["tokens_1"].shape == (len(a["done"]), views, 4, 50, 32) and a["tokens_1"].dtype == np.float16
        assert a["tokens_done"].all()
        # row-aligned: block 3's class token is the row's pooled feature (to float16 rounding)
        assert_same_features(a["tokens_3"][:, :, :, 0], a["features"], f"{split} class token")
        assert store.root[split].attrs["tokens"] == {"spec": SPEC, "layers": ["1", "2", "3"], "grid": [7, 7],
                                                    "cls": True, "dim": 32}
    assert store.root.attrs["config"]["tokens"] == SPEC
    assert store.verify() == []
    _, res = _extract(videos, cache.parent, tokens=SPEC)  # again: nothing left
    assert all(r.tokens == 0 and r.extracted == 0 for r in res.values())

    summary = print_info(cache)
    arrays = {(a["split"], a["array"]): a for a in summary["token_arrays"]}
    assert len(arrays) == 9 and summary["splits"]["train"]["tokens"]["done"] == 6
    a = arrays["train", "tokens_2"]
    on_disk = sum(f.stat().st_size for f in (cache / "train" / "tokens_2").iterdir() if f.is_file())
    assert (a["layer"], a["grid"], a["cls"], a["dim"], a["patches"], a["bytes"]) == ("2", [7, 7], True, 32, 50, on_disk)


# ---- (c) SIGKILL during an extension -------------------------------------------------------------------
def test_sigkill_during_a_token_extension_then_resume_equals_uninterrupted(plain, tokened, videos, tmp_path):
    """Killed midway, the extension's rerun finishes only the rows without tokens; the features stay untouched and
    the tokens equal an uninterrupted extraction's (to one float16 step: the resumed rows are encoded in other
    batches)."""
    from test_extract import fork_and_kill  # run_extract in a forked child, every video slowed, SIGKILLed midway

    cache = _copy(plain, tmp_path)
    before = _files(cache)
    kw = {**SETTINGS, "root": str(videos), "cache_dir": str(cache.parent), "tokens": SPEC, "batch_videos": 2,
          "flush_seconds": 0.0}

    def tokens_done() -> int:
        try:
            store = CacheStore(cache)
            return sum(int(store.tokens_done_mask(s).sum()) for s in store.splits)
        except Exception:  # arrays being made
            return 0

    killed_at = fork_and_kill(kw, cache, 2, 8, delay=0.15, cwd=tmp_path, done=tokens_done)  # well before the last row
    left = 10 - tokens_done()
    assert 0 < left <= 10 - killed_at

    _, res = _extract(videos, cache.parent)  # the rerun, without --tokens: the cache's own SPEC
    assert sum(r.tokens for r in res.values()) == left and sum(r.extracted for r in res.values()) == 0
    assert _files(cache) == before
    for split in ("train", "val", "test"):
        a, b = _arrays(cache, split), _arrays(tokened, split)
        assert a["tokens_done"].all()
        for name in ARRAYS:
            assert_same_features(a[name], b[name], f"{split}/{name}")
    assert CacheStore(cache).verify() == []


# ---- (d) damage -------------------------------------------------------------------------------------------
def test_damaged_token_chunks_are_found_and_repaired(tokened, videos, tmp_path):
    """A deleted and a truncated token chunk, corrupt zarr.json of a token array and of tokens_done, and a garbled
    tokens_done chunk are named; the rerun redoes those rows' tokens alone."""
    cache = _copy(tokened, tmp_path)
    features = _files(cache)
    (cache / "train/tokens_2/c.3.0.0.0.0").unlink()
    f = cache / "test/tokens_1/c.1.0.0.0.0"
    f.write_bytes(f.read_bytes()[:100])
    (cache / "val/tokens_3/zarr.json").write_text("{not json")
    (cache / "val/tokens_done/zarr.json").write_text("")  # written again, its chunks kept: nothing redone
    f = cache / "train/tokens_done/c/2"  # rows 4-5 (unit_rows 2)
    f.write_bytes(f.read_bytes()[:3])

    found = {(d.split, d.array): d for d in CacheStore(cache).verify()}
    assert set(found) == {("train", "tokens_2"), ("test", "tokens_1"), ("val", "tokens_3"), ("val", "tokens_done"),
                          ("train", "tokens_done")}
    assert found["train", "tokens_2"].rows == [3] and "chunk file missing" in str(found["train", "tokens_2"])
    assert found["test", "tokens_1"].fix == "chunk" and found["test", "tokens_1"].file == "test/tokens_1/c.1.0.0.0.0"
    assert found["val", "tokens_3"].fix == "meta" and found["train", "tokens_done"].rows == [4, 5]
    cheap = {(d.split, d.array) for d in CacheStore(cache).verify(deep=False)}  # what readers check: no chunk read
    assert {("train", "tokens_2"), ("val", "tokens_3")} <= cheap

    _, res = _extract(videos, cache.parent)
    assert (res["train"].tokens, res["test"].tokens, res["val"].tokens) == (3, 1, 0)
    assert all(r.extracted == 0 for r in res.values())
    assert CacheStore(cache).verify() == []
    assert _files(cache) == features  # features and their flags untouched
    for split in ("train", "val", "test"):
        a, b = _arrays(cache, split), _arrays(tokened, split)
        for name in ARRAYS:
            assert_same_features(a[name], b[name], f"{split}/{name}")


# ---- a rerun without --tokens, new videos ----------------------------------------------------------------------
def test_a_rerun_without_tokens_keeps_them_and_a_new_video_gets_both(tokened, videos, tmp_path):
    """A video that appears later gets its features and tokens in one go, from a rerun that names no SPEC; every
    row equals, by video id, the cache extracted from the whole tree."""
    tree = tmp_path / "videos"
    shutil.copytree(videos, tree)  # copy2: the same mtimes
    ref = CacheStore(tokened)
    late = ref.video_ids("train")[1]
    held = next(tree.glob(f"{late}.*"))
    stash = tmp_path / held.name
    held.rename(stash)
    path, _ = _extract(tree, tmp_path / "cache", tokens=SPEC)
    stash.rename(held)
    _, res = _extract(tree, tmp_path / "cache")
    assert res["train"].added == 1 and res["train"].extracted == 1 and res["train"].tokens == 0
    store = CacheStore(path)
    assert store.root.attrs["config"]["tokens"] == SPEC and store.tokens_done_mask("train").all()
    ids = store.video_ids("train")
    assert ids[-1] == late
    order = [ids.index(v) for v in ref.video_ids("train")]
    a, b = _arrays(path, "train"), _arrays(tokened, "train")
    for name in ("features", *ARRAYS):
        assert_same_features(a[name][order], b[name], name)


# ---- (e) refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, spec, said", [
    ("mdmf-tiny-vit3", "1,,2", "--tokens '1,,2': name one or more layers"),
    ("mdmf-tiny-vit3", "last@0x3", "the grid after @ is HxW with H, W >= 1"),
    ("mdmf-tiny-vit3", "4", "--tokens 4 on mdmf-tiny-vit3: block 4 does not exist; it has 3 blocks"),
    ("mdmf-tiny-vit3", "map", "map is a ResNet's last stage"),
    ("mdmf-tiny-vit3", "last@8x8", "the grid 8x8 is larger than the backbone's 7x7 patches"),
    ("mdmf-tiny-vit3", "3,last", "last is block 3, named twice"),
    ("mdmf-tiny-rn", "2", "a ResNet gives only map"),
])
def test_bad_specs_and_backbone_refusals_are_one_line_before_any_work(model, spec, said, videos, tmp_path,
                                                                      cli_runner, monkeypatch, capsys):
    """Through the CLI's own entry: exit 2, one line, no backbone loaded, no cache made."""
    import cli
    import mdmf_cache.clip.backbone as backbone

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    monkeypatch.setattr(sys, "argv", ["mdmf-cache", "extract", "folder", "--root", str(videos), "--cache-dir",
                                      str(tmp_path / "c"), "--model", model, "--pretrained", "none", "--tokens", spec])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and said in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_another_spec_is_refused_naming_both_and_overwrite_replaces_the_tokens(tokened, videos, tmp_path,
                                                                              monkeypatch):
    """A cache with tokens 1,2,3 asked for last: refused before the backbone loads, nothing written; --overwrite
    replaces the token arrays and keeps the features."""
    import mdmf_cache.clip.backbone as backbone

    cache = _copy(tokened, tmp_path)
    before = _files(cache, skip_tokens=False)
    load = backbone.load_backbone
    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    with pytest.raises(CacheError) as e:
        _extract(videos, cache.parent, tokens="last@2x2")
    assert "holds tokens 1,2,3, asked for tokens last@2x2" in str(e.value) and "\n" not in str(e.value)
    assert _files(cache, skip_tokens=False) == before
    with pytest.raises(ConfigError, match=r"bad options: --tokens x: 'x' is not a layer"):
        ExtractConfig(**SETTINGS, root=str(videos), tokens="x").validate()

    monkeypatch.setattr(backbone, "load_backbone", load)
    _, res = _extract(videos, cache.parent, tokens="last@2x2", overwrite=True)
    assert res["train"].tokens == 6 and res["train"].extracted == 0
    store = CacheStore(cache)
    g = store.root["train"]
    assert sorted(k for k in g.array_keys() if k.startswith("tokens")) == ["tokens_done", "tokens_last"]
    assert g["tokens_last"].shape == (6, 2, 4, 5, 32) and store.tokens_info("train").grid == (2, 2)
    assert {k: v for k, v in _files(cache).items() if "features" in k} == \
        {k: v for k, v in before.items() if "features" in k}
