"""What ``mdmf-cache predict`` reads: the support and query videos, the backbone a run's features came
from, and the cache of the support and query videos' features (docs/predict.md).

* :func:`find_support` and :func:`find_queries` list the videos (files or JPEG frame folders, as ``extract``
  reads them).
* :func:`run_backbone` says which CLIP, weights and test-time settings (frames, sampler, pixels, prompts)
  made a run's features: a fast-mode run's cache fingerprint (recorded in its ``config.json``), or a
  full-mode run's ``backbone.pt`` with its video options.
* :class:`PredictCache` holds the videos' features in a cache group of the store (:mod:`mdmf_cache.store.cache`),
  written by the extraction pieces ``extract`` uses (:mod:`mdmf_cache.extraction.build`), with val/test
  settings: the middle frame of every segment, the centre crop. A row belongs to a video file (its
  resolved path, size and mtime): a second call with the same videos reads them without loading the
  backbone, a video added since is extracted alone, a file replaced since is extracted again. The class
  prompts' text embeddings are kept beside the group, keyed by prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.configs import ExtractConfig, FullModeConfig, PredictConfig
from mdmf_cache.data.datasets import FRAME_EXTS, VIDEO_EXTS, Split, _has_frames
from mdmf_cache.errors import CacheError, ConfigError, DatasetError

log = logging.getLogger(__name__)

__all__ = ["find_support", "find_queries", "queries_among_supports", "is_video", "video_key", "RunBackbone", "run_backbone", "PredictCache",
           "VideoFeatures", "usable_supports"]

#: The cache group's only split: val/test sampling (one view, middle frames, centre crop), one dummy class.
SPLIT = "test"
_EXTS = ", ".join((*VIDEO_EXTS, "a folder of " + "/".join(FRAME_EXTS)))


# ---- the videos ----------------------------------------------------------------------------------------

def is_video(path: Path) -> bool:
    """A video file (by extension) or a folder holding frames, as ``extract`` reads them."""
    if path.name.startswith("."):
        return False
    if path.is_file():
        return path.suffix.lower() in VIDEO_EXTS
    return path.is_dir() and _has_frames(path)


def find_support(root: Path | str) -> dict[str, list[Path]]:
    """``SUPPORT/<class>/<video>`` -> {class: its videos}, classes and videos sorted by name.

    Raises:
        DatasetError: not a folder, a class folder without videos (named), or fewer than 2 classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--support {root} is not a folder; expected SUPPORT/<class>/<video> ({_EXTS})")
    if _has_frames(root):
        raise DatasetError(f"--support {root} is a frame folder; expected SUPPORT/<class>/<video>: one folder per class")
    classes = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    loose = [p for p in root.iterdir() if p.is_file() and is_video(p)]
    if loose:
        log.warning("--support %s: %d videos outside a class folder are ignored (e.g. %s); put them in "
                    "SUPPORT/<class>/", root, len(loose), loose[0].name)
    found = {d.name: sorted((p for p in d.iterdir() if is_video(p)), key=lambda p: p.name) for d in classes}
    frame_classes = [c for c in found if _has_frames(root / c)]
    if frame_classes and len(frame_classes) == len(found):
        raise DatasetError(f"--support {root} holds frame folders, not class folders (e.g. {frame_classes[0]}); "
                           f"try --support {root.parent}")
    empty = [c for c, v in found.items() if not v]
    if empty:
        raise DatasetError(f"support class{'es' if len(empty) > 1 else ''} {', '.join(empty)} "
                           f"{'have' if len(empty) > 1 else 'has'} no video: {root / empty[0]} holds no {_EXTS}")
    if len(found) < 2:
        raise DatasetError(f"--support {root}: {len(found)} class folder{'' if len(found) == 1 else 's'}"
                           f"{' (' + ', '.join(found) + ')' if found else ''}; a prediction chooses between at least "
                           "2 classes: one folder of videos per class")
    return found


def find_queries(paths: list[Path | str] | tuple[Path | str, ...]) -> list[Path]:
    """The videos to label: each path a video (file or frame folder) or a folder searched recursively (frame
    folders are videos, not searched further; hidden entries skipped). Sorted per folder, deduplicated.

    Raises:
        DatasetError: a path that does not exist or is not a video, or no video at all.
    """
    out: dict[Path, Path] = {}  # resolved -> as found
    for p in map(Path, paths):
        if not p.exists():
            raise DatasetError(f"--query {p}: no such file or folder")
        if is_video(p):
            out.setdefault(p.resolve(), p)
            continue
        if p.is_file():
            raise DatasetError(f"--query {p} is not a video ({_EXTS})")
        seen: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
            real = Path(dirpath).resolve()
            if real in seen:  # a link back up the tree
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            videos = [Path(dirpath) / f for f in sorted(filenames) if is_video(Path(dirpath) / f)]
            frames = [d for d in dirnames if _has_frames(Path(dirpath) / d)]
            videos += [Path(dirpath) / d for d in frames]
            dirnames[:] = [d for d in dirnames if d not in frames]
            for v in sorted(videos):
                out.setdefault(v.resolve(), v)
    if not out:
        raise DatasetError(f"no query video under {', '.join(map(str, paths))}: expected {_EXTS} (folders are "
                           "searched recursively)")
    return list(out.values())


#: How much of a file :func:`queries_among_supports` hashes to tell a copy of a video (with its size).
HEAD_BYTES = 1 << 20


def _head_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read(HEAD_BYTES)).hexdigest()


def queries_among_supports(support: dict[str, list[Path]], queries: list[Path]) -> list[tuple[Path, str, Path, str]]:
    """``(query, class, support video, how)`` for each query that is also one of the supports: the same file or frame
    folder by resolved path (``how`` "the same file"), or a video file of the same content, a copy (the same size and
    the same first MB: "the same content"). Only files of a support's size are read."""
    by_path: dict[Path, tuple[str, Path]] = {}
    by_size: dict[int, list[tuple[str, Path]]] = {}
    for c, videos in support.items():
        for v in videos:
            by_path.setdefault(v.resolve(), (c, v))
            if v.is_file():
                by_size.setdefault(v.stat().st_size, []).append((c, v))
    hashes: dict[Path, str] = {}

    def head(p: Path) -> str:
        if p not in hashes:
            hashes[p] = _head_hash(p)
        return hashes[p]

    found = []
    for q in queries:
        real = q.resolve()
        if real in by_path:
            found.append((q, *by_path[real], "the same file"))
            continue
        if not q.is_file():
            continue
        same = [(c, v) for c, v in by_size.get(q.stat().st_size, []) if head(v.resolve()) == head(real)]
        if same:
            found.append((q, *same[0], "the same content"))
    return found


def video_key(path: Path) -> str:
    """A video's row in the cache: its resolved path, size and mtime (a file replaced since is another video)."""
    real = Path(path).resolve()
    st = os.stat(real)
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


# ---- the run's backbone -----------------------------------------------------------------------------

@dataclass
class RunBackbone:
    """The backbone and test-time settings of a run's features.

    Attributes:
        ecfg: extraction settings (model, ``pretrained``, T, sampler, normalisation, prompt template,
            clean names, decoder, workers, device) for the predict cache.
        weights: the weights id the run's features were made with (a tag, ``sha256:...`` or random init).
        what: the backbone in words, for messages.
        tokens: the token SPEC the run's head reads (``ecfg.tokens``: the videos get token arrays too); None: a head
            of pooled features.
    """

    ecfg: ExtractConfig
    weights: str
    what: str

    @property
    def tokens(self) -> str | None:
        return self.ecfg.tokens

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the frame features (the fingerprint's fields, checked against a reused cache)."""
        e = self.ecfg
        return {"model": e.model, "weights": self.weights, "num_frames": e.num_frames, "sampler": e.sampler,
                "normalize": e.normalize}


def _fast_run_fingerprint(run: Path, run_cfg: dict[str, Any], cache: str | None,
                          weights: str | None) -> tuple[dict, dict | None]:
    """(fingerprint, the cache's saved ExtractConfig or None) of a fast run's cache: the fingerprint from
    ``config.json``'s record when the cache is not needed (the weights are a tag, a random init, or given as
    ``weights``), else from the cache."""
    from mdmf_cache.store.runs import run_cache
    from mdmf_cache.store.cache import CacheStore

    recorded = (run_cfg.get("cache_identity") or {}).get("fingerprint")
    if recorded and not cache and (weights or not str(recorded["video"].get("weights", "")).startswith("sha256:")):
        return recorded, None
    try:
        store = CacheStore(run_cache(run, run_cfg, cache))
    except (ConfigError, CacheError) as e:
        if recorded:  # a checkpoint file: its path is in the cache only
            raise ConfigError(f"{run}'s backbone is the checkpoint {recorded['video']['weights'][:19]}..., whose path "
                              f"only its cache records, and {e}; or pass --weights PATH (checked by its sha256)") from e
        raise
    return store.fingerprint, dict(store.root.attrs.get("config") or {})


def run_backbone(run: Path, run_cfg: dict[str, Any], cfg: PredictConfig) -> RunBackbone:
    """The backbone and test-time settings of a run's features (module docstring).

    Raises:
        ConfigError: a full run without a usable ``backbone.pt``; a fast run's checkpoint that is not found or
            is not the one recorded (sha256); ``--weights`` with a full run.
    """
    from mdmf_cache.clip.backbone import weights_id
    from mdmf_cache.store.runs import full_run_backbone

    common = dict(dataset="folder", name="predict", seed=0, flip=False, train_views=1, device=cfg.device,
                  workers=cfg.workers, progress=False)
    if run_cfg.get("mode") == "full":
        if cfg.weights:
            raise ConfigError(f"--weights: {run} is a full-mode run, whose backbone is its backbone.pt")
        path, wid = full_run_backbone(run)
        data = run_cfg.get("resolved_data") or dataclasses.asdict(FullModeConfig(**run_cfg["full"]).extract_config(
            run_cfg.get("preset") or "paper", 0, cfg.device))
        keep = ("model", "num_frames", "sampler", "normalize", "prompt_template", "clean_names", "decoder")
        ecfg = ExtractConfig(**{k: data[k] for k in keep}, pretrained=str(path), **common)
        return RunBackbone(ecfg, wid, f"{data['model']} fine-tuned by {run} ({path})")
    fp, saved = _fast_run_fingerprint(run, run_cfg, cfg.cache, cfg.weights)
    video, text = fp["video"], fp.get("text") or {}
    wid = str(video["weights"])
    if wid.startswith("sha256:"):
        candidates = [c for c in (cfg.weights, (saved or {}).get("pretrained")) if c]
        pretrained = next((c for c in candidates if Path(c).is_file() and weights_id(c) == wid), None)
        if pretrained is None:
            tried = "; ".join(f"{c}: {'not a file' if not Path(c).is_file() else weights_id(c)[:19] + '...'}"
                              for c in candidates) or "no checkpoint path recorded"
            raise ConfigError(f"{run}'s features were made with the checkpoint {wid[:19]}... ({tried}); pass "
                              "--weights PATH to that checkpoint (checked by its sha256)")
    elif wid.startswith("random-init"):
        if wid != weights_id(None):
            raise ConfigError(f"{run}'s features were made with a random init ({wid}) that this version does not "
                              f"make ({weights_id(None)}); extract and train again")
        if cfg.weights:
            raise ConfigError(f"--weights: {run}'s backbone is a random init ({video['model']}), not a checkpoint")
        pretrained = None
    else:  # an open_clip tag: not verifiable against a local file
        pretrained = cfg.weights or wid
        if cfg.weights:
            log.warning("--weights %s stands in for open_clip's %r weights of %s; mdmf-cache cannot check that "
                        "they are the same", cfg.weights, wid, video["model"])
    ecfg = ExtractConfig(model=video["model"], pretrained=pretrained, num_frames=int(video["num_frames"]),
                         sampler=video["sampler"], normalize=video["normalize"],
                         prompt_template=text.get("prompt_template", ExtractConfig.prompt_template),
                         clean_names=bool(text.get("clean_names", False)),
                         decoder=(saved or {}).get("decoder", "auto"), tokens=_run_tokens(run, run_cfg, cfg.cache),
                         **common)
    return RunBackbone(ecfg, wid, f"{video['model']} with weights {wid if len(wid) < 30 else wid[:19] + '...'}")


def _run_tokens(run: Path, run_cfg: dict[str, Any], cache: str | None) -> str | None:
    """The token SPEC a fast run's head read: recorded in its ``config.json`` (``tokens``), else its cache's train
    split's, else the head's released ``SPEC.tokens``; None for a head of pooled features."""
    from mdmf_cache import heads
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.runs import run_cache

    spec = heads.get(run_cfg.get("method", "mdmf")).tokens
    if not spec:
        return None
    if run_cfg.get("tokens"):
        return str(run_cfg["tokens"]["spec"])
    with contextlib.suppress(ConfigError, CacheError, KeyError):
        info = CacheStore(run_cache(run, run_cfg, cache)).tokens_info("train")
        if info is not None:
            return info.spec
    return spec


# ---- the features ---------------------------------------------------------------------------------

@dataclass
class VideoFeatures:
    """Features of a list of videos, in its order.

    Attributes:
        features: ``(R, T, D)`` float16 (zeros where a video failed).
        errors: ``(R,)`` why each video could not be decoded ('' when it was).
        rows: ``(R,)`` each video's row among the group's usable rows (what :meth:`PredictCache.tokens`'s reader
            reads; -1 where it failed).
        extracted: videos decoded and encoded by this call (failures included).
        backbone_loaded: this call loaded the backbone.
    """

    features: np.ndarray
    errors: list[str]
    extracted: int = 0
    backbone_loaded: bool = False
    rows: np.ndarray | None = None


class PredictCache:
    """The features and prompt embeddings of the videos ``predict`` is given, under ``root`` (module docstring).

    One cache group per backbone and settings: ``root/predict-<hash>__<model>__<weights>.zarr``, whose one split
    holds every video seen so far (a row per video file), and ``...text.npz`` beside it (prompt -> embedding).
    """

    def __init__(self, root: Path | str, backbone: RunBackbone, progress: bool = False) -> None:
        from mdmf_cache.clip.backbone import pretrained_slug
        from mdmf_cache.store.layout import group_name

        self.root = Path(root)
        self.run_backbone = backbone
        self.progress = progress
        self._backbone = None
        # a token SPEC is a group of its own (a group holds one SPEC); without one the hash is as it always was
        h = hashlib.sha256(json.dumps({**backbone.settings, "open_clip": _open_clip_version(),
                                       **({"tokens": backbone.tokens} if backbone.tokens else {})},
                                      sort_keys=True).encode()).hexdigest()[:10]
        e = backbone.ecfg
        self.path = self.root / group_name(f"predict-{h}", e.model, pretrained_slug(e.pretrained))
        self.text_path = self.path.with_name(self.path.name[: -len(".zarr")] + ".text.npz")

    @property
    def backbone_loaded(self) -> bool:
        """This object has loaded the backbone (something had to be extracted or encoded)."""
        return self._backbone is not None

    # -- the backbone, loaded at most once and only when something must be computed
    def backbone(self):
        if self._backbone is None:
            from mdmf_cache.clip.backbone import load_backbone

            e = self.run_backbone.ecfg
            try:
                bb = load_backbone(e.model, e.pretrained, e.device)
            except ConfigError as err:
                tag = e.pretrained and not Path(e.pretrained).is_file()
                why = (f" open_clip downloads its {e.pretrained!r} weights on first use and could not here (offline, "
                       "or not in its cache): run once with internet access, or pass --weights PATH to a local "
                       "checkpoint of those weights." if tag else "")
                raise ConfigError(f"cannot load the backbone of this run's features, {self.run_backbone.what}:{why} "
                                  f"({err})") from err
            self._backbone = bb
        return self._backbone

    # -- frame features
    def _complete(self, keys: list[str]) -> bool:
        """Every key has a finished row in a sound group of these settings (nothing to extract)."""
        from mdmf_cache.store.cache import CacheStore
        from mdmf_cache.store.verify import meta_problem

        if meta_problem(self.path):
            return False
        try:
            store = CacheStore(self.path)
            video = store.fingerprint.get("video") or {}
            if any(video.get(k) != v for k, v in self.run_backbone.settings.items()) or SPLIT not in store.splits:
                return False
            store.check([SPLIT])
            done_mask = store.done_mask(SPLIT)
            if self.run_backbone.tokens:  # a token head's videos need their tokens too
                done_mask = done_mask & store.tokens_done_mask(SPLIT)
            done = dict(zip(store.video_ids(SPLIT), done_mask))
        except CacheError as e:  # damage: the extraction below repairs it
            log.warning("%s: %s; extracting again what it needs", self.path, e)
            return False
        return all(done.get(k, False) for k in keys)

    def _extract(self, keys: list[str], videos: list[Path]) -> int:
        """Decode and encode the videos without a finished row (under the group's lock); returns how many."""
        from mdmf_cache.extraction.build import extract_lock, extract_split, prepare_cache
        from mdmf_cache.extraction.embed import fingerprint
        from mdmf_cache.store.cache import CacheStore
        from mdmf_cache.store.verify import meta_problem

        backbone = self.backbone()
        e = dataclasses.replace(self.run_backbone.ecfg, cache_dir=str(self.root),
                                root=os.path.commonpath([str(v.resolve().parent) for v in videos]))
        fp = fingerprint(e, self.run_backbone.weights, {})
        with extract_lock(self.path):
            # every video seen so far stays listed (present while its file is unchanged), so that labelling
            # another folder does not count the last one's videos as vanished
            old: list[str] = []
            if not meta_problem(self.path):
                with contextlib.suppress(CacheError):  # a damaged split: repaired by prepare_cache
                    store = CacheStore(self.path)
                    old = store.video_ids(SPLIT) if SPLIT in store.splits else []
            listed = dict.fromkeys([*keys, *old])
            paths = dict(zip(keys, videos))
            for k in listed:
                if k not in paths:
                    p = Path(k.rsplit("|", 2)[0])
                    paths[k] = p if p.exists() and video_key(p) == k else None
            ids = list(listed)
            split = Split(SPLIT, ["video"], ["video"], ids, np.zeros(len(ids), dtype=np.int32), "predict",
                          paths=[paths[k] for k in ids])
            store = CacheStore.open_for_writing(self.path, fp)
            tokens = backbone.token_info(e.tokens) if e.tokens else None  # the run's SPEC on its backbone
            res = prepare_cache(store, {SPLIT: split}, e, backbone, tokens)[SPLIT]
            if self.progress:
                from mdmf_cache.progress import make_progress

                with make_progress("videos") as bar:
                    extract_split(store, split, e, backbone, bar, res)
            else:
                extract_split(store, split, e, backbone, res=res)
        log.info("extracted %d videos into %s (%d failed), reused %d", res.extracted + res.failed, self.path,
                 res.failed, res.reused)
        return res.extracted + res.failed

    def features(self, videos: list[Path]) -> VideoFeatures:
        """The frame features of ``videos`` (extracting those the cache lacks; nothing loaded when none)."""
        from mdmf_cache.store.cache import CacheStore

        keys = [video_key(v) for v in videos]
        extracted, loaded = 0, False
        if not self._complete(keys):
            extracted, loaded = self._extract(keys, videos), True
        store = CacheStore(self.path)
        pos = {v: i for i, v in enumerate(store.video_ids(SPLIT))}
        rows = np.array([pos[k] for k in keys], dtype=np.int64)
        uniq, back = np.unique(rows, return_inverse=True)
        feats = np.asarray(store.root[SPLIT]["features"].oindex[uniq])[back, 0]  # (R, T, D), view 0
        failed, errors = store._rows(SPLIT, "failed").astype(bool), store._rows(SPLIT, "errors")
        errs = [str(errors[r]) or "could not be decoded" if failed[r] else "" for r in rows]
        from mdmf_cache.store.read import usable_rows

        keep = usable_rows(store, SPLIT)
        usable = np.full(store.num_rows(SPLIT), -1, dtype=np.int64)
        usable[keep] = np.arange(len(keep))
        return VideoFeatures(feats, errs, extracted, loaded, usable[rows])

    def tokens(self, budget: int):
        """A :class:`~mdmf_cache.store.tokens.TokenReader` of the group's tokens (after :meth:`features`), rows as
        :attr:`VideoFeatures.rows`; close it."""
        from mdmf_cache.store.tokens import TokenReader

        return TokenReader(self.path, SPLIT, budget, self.run_backbone.tokens)

    # -- prompt embeddings
    def text(self, prompts: list[str]) -> np.ndarray:
        """``(N, D)`` float32 text embeddings of ``prompts`` (those not kept yet encoded, then kept)."""
        from mdmf_cache.fileio import atomic_write_file

        kept: dict[str, np.ndarray] = {}
        if self.text_path.is_file():
            try:
                with np.load(self.text_path, allow_pickle=False) as z:
                    if str(z["weights"]) == self.run_backbone.weights:
                        kept = dict(zip(z["prompts"].tolist(), z["embeddings"]))
            except (OSError, ValueError, KeyError) as e:
                log.warning("%s is unreadable (%s); encoding the prompts again", self.text_path, e)
        todo = [p for p in dict.fromkeys(prompts) if p not in kept]
        if todo:
            kept.update(zip(todo, self.backbone().encode_texts(todo).numpy().astype(np.float32)))
            names = list(kept)

            def write(tmp: Path) -> None:
                buf = io.BytesIO()
                np.savez(buf, prompts=np.array(names), embeddings=np.stack([kept[p] for p in names]),
                         weights=np.array(self.run_backbone.weights))
                tmp.write_bytes(buf.getvalue())

            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_file(self.text_path, write)
        return np.stack([kept[p] for p in prompts])


def _open_clip_version() -> str:
    """open_clip's version without importing it (seconds): the cache group of a newer open_clip is another."""
    from importlib import metadata

    try:
        return metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        return "unknown"


def usable_supports(support: dict[str, list[Path]], errors: dict[Path, str]) -> dict[str, list[Path]]:
    """The supports that decoded, per class; failures logged.

    Raises:
        DatasetError: a class none of whose videos decoded (the class and its files named).
    """
    out, dead = {}, []
    for c, videos in support.items():
        out[c] = [v for v in videos if not errors.get(v)]
        for v in videos:
            if errors.get(v):
                log.warning("support %s: %s could not be decoded (%s); left out", c, v, errors[v])
        if not out[c]:
            dead.append(c)
    if dead:
        c = dead[0]
        files = "; ".join(f"{v.name}: {errors[v]}" for v in support[c][:3])
        raise DatasetError(f"support class{'es' if len(dead) > 1 else ''} {', '.join(dead)}: no video could be decoded "
                           f"({c}: {files}{'; ...' if len(support[c]) > 3 else ''}); replace the files or remove the class")
    return out
