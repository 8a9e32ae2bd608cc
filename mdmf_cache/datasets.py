"""Datasets: split files, class maps, and resolving split entries to video files.

A split file line is ``class/video`` (SPEC section 2). The class index map of each split is built
from the split file itself (sorted class names; SSv2-Full label ids sort numerically), never from a
hand-written list. Entries resolve to a video file (``.avi .mp4 .webm .mkv``) or a folder of JPEG
frames, under ``root/class/video`` or, as the SSv2 download is laid out, ``root/video``.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VIDEO_EXTS = (".avi", ".mp4", ".webm", ".mkv")
FRAME_EXTS = (".jpg", ".jpeg")


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: where its split files live and how its classes are named.

    Attributes:
        name: CLI name.
        split_dir: sub-directory of the splits directory.
        files: split name -> file name.
        flip: default of train-time horizontal flips. True for every dataset, SSv2 included: the paper
            states the augmentation and the released code flips (SPEC 4); ``--no-flip`` turns it off.
        numeric_labels: classes are SSv2 label ids that need a names table.
        drop_stray: drop Kinetics-CMN's stray ids (``under_score`` duplicate classes, repeated class blocks).
    """

    name: str
    split_dir: str
    files: dict[str, str]
    flip: bool = True
    numeric_labels: bool = False
    drop_stray: bool = False


_STD_FILES = {"train": "trainlist03.txt", "val": "vallist03.txt", "test": "testlist03.txt"}
DATASETS: dict[str, DatasetSpec] = {
    "ucf101": DatasetSpec("ucf101", "ucf_ARN", _STD_FILES),
    "hmdb51": DatasetSpec("hmdb51", "hmdb_ARN", _STD_FILES),
    "kinetics100": DatasetSpec(
        "kinetics100", "kinetics_CMN", {**_STD_FILES, "test": "testlist03_bb.txt"}, drop_stray=True
    ),
    "ssv2-small": DatasetSpec("ssv2-small", "ssv2_CMN", _STD_FILES),
    "ssv2-full": DatasetSpec("ssv2-full", "ssv2_OTAM", _STD_FILES, numeric_labels=True),
}
DATASET_NAMES = (*DATASETS, "folder")


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        classes: sorted class keys as written in the split file (C,).
        class_names: human-readable names used in prompts (C,), e.g. SSv2 templates for label ids.
        video_ids: ``class/video`` ids in split-file order (N,).
        labels: index into ``classes`` per video (N,).
        source_hash: sha256 of the split file (or of the generated list) for the cache fingerprint.
    """

    name: str
    classes: list[str]
    class_names: list[str]
    video_ids: list[str]
    labels: np.ndarray
    source_hash: str
    paths: list[Path | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.video_ids)

    def found(self) -> tuple[list[str], list[Path], np.ndarray]:
        """(ids, paths, labels) of the entries ``resolve_paths`` found: the cache's rows, in order."""
        keep = [i for i, p in enumerate(self.paths) if p is not None]
        return [self.video_ids[i] for i in keep], [self.paths[i] for i in keep], self.labels[keep].astype(np.int32)


def clean_class_name(name: str) -> str:
    """SPEC section 5 ``clean``: underscores to spaces, drop SSv2 brackets, squeeze spaces."""
    name = name.replace("_", " ").replace("[", "").replace("]", "")
    return re.sub(r"\s+", " ", name).strip()


def _sha256_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_split_file(path: Path) -> list[str]:
    """Non-blank, stripped ``class/video`` lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read split file {path}: {e.strerror}; check --splits") from e
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    bad = [ln for ln in lines if "/" not in ln]
    if bad:
        raise DatasetError(f"{path}: {len(bad)} lines are not 'class/video' (first: {bad[0]!r})")
    return lines


def _drop_stray(lines: list[str]) -> list[str]:
    """Drop Kinetics-CMN's stray ids.

    The lists are one contiguous block per class followed by a tail of stray ids (174 in
    ``trainlist03.txt``): ``air_drumming/..`` next to ``air drumming/..``, and further ids of
    classes whose block ended earlier. Both kinds are dropped, leaving 100 per class.
    """
    classes = {ln.split("/", 1)[0] for ln in lines}
    stray = {c for c in classes if "_" in c and c.replace("_", " ") in classes}
    kept: list[str] = []
    seen: set[str] = set()  # classes whose first block was kept
    for c, run in itertools.groupby((ln for ln in lines if ln.split("/", 1)[0] not in stray),
                                    key=lambda ln: ln.split("/", 1)[0]):
        if c not in seen:  # a later run of a class is part of the stray tail
            seen.add(c)
            kept.extend(run)
    if len(kept) != len(lines):
        log.info("dropped %d stray entries (%d under_score duplicate classes)", len(lines) - len(kept), len(stray))
    return kept


def _ssv2_names(splits_dir: Path, root: Path | None) -> dict[str, str]:
    """SSv2 label id -> template text, from the user's labels.json, else class_names.tsv."""
    names: dict[str, str] = {}
    tsv = splits_dir / "class_names.tsv"
    if tsv.is_file():
        with tsv.open(encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                names[str(int(row["label_id"]))] = row["template"]
    for candidate in ([root / "labels.json", root.parent / "labels.json"] if root else []):
        if candidate.is_file():
            data = json.loads(candidate.read_text(encoding="utf-8"))
            # SSv2 labels.json maps template -> id string.
            names.update({str(int(v)): k for k, v in data.items()})
            break
    return names


def _sort_classes(classes: set[str], numeric: bool) -> list[str]:
    return sorted(classes, key=int) if numeric else sorted(classes)


def _make_split(name: str, lines: list[str], numeric: bool, names: dict[str, str] | None, source_hash: str) -> Split:
    classes = _sort_classes({ln.split("/", 1)[0] for ln in lines}, numeric)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[ln.split("/", 1)[0]] for ln in lines], dtype=np.int32)
    if names is not None:
        missing = [c for c in classes if c not in names]
        if missing:
            log.warning(
                "%s: no class name for %d label ids (%s); put the SSv2 labels.json in --root. Using 'label <id>'.",
                name, len(missing), ", ".join(missing[:5]),
            )
        class_names = [names.get(c, f"label {c}") for c in classes]
    else:
        class_names = list(classes)
    return Split(name, classes, class_names, list(lines), labels, source_hash)


def load_builtin_splits(dataset: str, splits_dir: Path, root: Path | None = None) -> dict[str, Split]:
    """Parse the three split files of a built-in dataset.

    Args:
        dataset: a key of ``DATASETS``.
        splits_dir: directory holding ``<split_dir>/trainlist03.txt`` etc. (or the files themselves).
        root: video root, only used to find SSv2's ``labels.json``.
    """
    spec = DATASETS[dataset]
    base = Path(splits_dir)
    if (base / spec.split_dir).is_dir():
        base = base / spec.split_dir
    names = _ssv2_names(base, root) if spec.numeric_labels else None
    out = {}
    for split, fname in spec.files.items():
        path = base / fname
        if not path.is_file():
            raise DatasetError(f"{dataset}: split file {path} not found; --splits should point at the folder holding {spec.split_dir}/")
        lines = read_split_file(path)
        if spec.drop_stray:
            lines = _drop_stray(lines)
        out[split] = _make_split(split, lines, spec.numeric_labels, names, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def scan_folder(root: Path) -> list[str]:
    """``class/video`` ids of a ``root/class/video.ext`` (or ``root/class/video/*.jpg``) tree, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"video root {root} is not a directory; pass --root DIR")
    ids = []
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        for item in sorted(cdir.iterdir()):
            if item.is_file() and item.suffix.lower() in VIDEO_EXTS:
                ids.append(f"{cdir.name}/{item.stem}")
            elif item.is_dir():
                ids.append(f"{cdir.name}/{item.name}")
    if not ids:
        raise DatasetError(f"no videos under {root}: expected root/class/video.ext ({', '.join(VIDEO_EXTS)})")
    return ids


def load_folder_splits(
    root: Path,
    splits_dir: Path | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> dict[str, Split]:
    """Splits for a user's own ``root/class/video.ext`` tree.

    With ``splits_dir`` holding ``trainlist03.txt``/``vallist03.txt``/``testlist03.txt`` (or
    ``train.txt``/``val.txt``/``test.txt``) those are used; otherwise classes are shuffled with
    ``seed`` and divided class-disjointly by ``fractions``.
    """
    if splits_dir is not None:
        out = {}
        for split in SPLITS:
            for fname in (_STD_FILES[split], f"{split}.txt"):
                path = Path(splits_dir) / fname
                if path.is_file():
                    out[split] = _make_split(split, read_split_file(path), False, None, hashlib.sha256(path.read_bytes()).hexdigest())
                    break
            else:
                raise DatasetError(f"folder: no {_STD_FILES[split]} or {split}.txt in {splits_dir}")
        return out
    ids = scan_folder(root)
    classes = sorted({i.split("/", 1)[0] for i in ids})
    if len(classes) < 3:
        raise DatasetError(f"folder: need at least 3 classes for class-disjoint splits, found {len(classes)} in {root}")
    order = np.random.default_rng(seed).permutation(len(classes))
    n_train = max(1, round(fractions[0] * len(classes)))
    n_val = max(1, round(fractions[1] * len(classes)))
    n_train = min(n_train, len(classes) - n_val - 1)
    groups = {
        "train": {classes[i] for i in order[:n_train]},
        "val": {classes[i] for i in order[n_train : n_train + n_val]},
        "test": {classes[i] for i in order[n_train + n_val :]},
    }
    out = {}
    for split in SPLITS:
        lines = [i for i in ids if i.split("/", 1)[0] in groups[split]]
        out[split] = _make_split(split, lines, False, None, _sha256_lines(lines))
    return out


def load_splits(dataset: str, splits_dir: Path | None, root: Path | None, seed: int = 0) -> dict[str, Split]:
    """Splits of a built-in dataset or of ``folder``; raises DatasetError naming valid datasets."""
    if dataset == "folder":
        if root is None:
            raise DatasetError("dataset 'folder' needs --root DIR (a root/class/video.ext tree)")
        return load_folder_splits(root, splits_dir, seed)
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    if splits_dir is None:
        raise DatasetError(f"{dataset} needs --splits DIR (the folder holding {DATASETS[dataset].split_dir}/)")
    return load_builtin_splits(dataset, splits_dir, root)


class VideoIndex:
    """Finds the file or frame folder of each ``class/video`` id under a root, scanning it once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"video root {self.root} is not a directory; pass --root DIR")
        self.nested: dict[tuple[str, str], Path] = {}
        self.flat: dict[str, Path] = {}
        for top in os.scandir(self.root):
            if top.is_file():
                stem, ext = os.path.splitext(top.name)
                if ext.lower() in VIDEO_EXTS:
                    self.flat[stem] = Path(top.path)
            elif top.is_dir():
                self.flat.setdefault(top.name, Path(top.path))  # may be a flat frame folder
                for item in os.scandir(top.path):
                    stem, ext = os.path.splitext(item.name)
                    if item.is_file() and ext.lower() in VIDEO_EXTS:
                        self.nested[(top.name, stem)] = Path(item.path)
                    elif item.is_dir():
                        self.nested[(top.name, item.name)] = Path(item.path)

    def resolve(self, video_id: str) -> Path | None:
        cls, vid = video_id.split("/", 1)
        path = self.nested.get((cls, vid))
        if path is None:
            path = self.flat.get(vid)
            if path is not None and path.is_dir() and not _has_frames(path):
                path = None  # a class directory, not a frame folder
        return path


def _has_frames(folder: Path) -> bool:
    return any(os.path.splitext(n)[1].lower() in FRAME_EXTS for n in os.listdir(folder))


def resolve_paths(split: Split, root: Path) -> list[str]:
    """Fill ``split.paths``; return the ids that were not found."""
    index = VideoIndex(root)
    split.paths = [index.resolve(v) for v in split.video_ids]
    return [v for v, p in zip(split.video_ids, split.paths) if p is None]
