"""Datasets: split files, class maps, and resolving split entries to video files.

A split file line is ``class/video`` (docs/method.md §2). The split files of the five built-in
datasets ship inside the package (``mdmf_cache/data/splits/``, :func:`shipped_splits_dir`); ``--splits DIR``
points at other copies. The class index map of each split is built
from the split file itself (sorted class names; SSv2-Full label ids sort numerically), never from a
hand-written list. Entries resolve to a video file (``.avi .mp4 .webm .mkv .mov``) or a folder of
frames, under ``root/class/video`` or, as the SSv2 download is laid out, ``root/video``. Class
folders match case-insensitively and with ``_`` for spaces (``root/air_drumming/`` holds the
videos of class ``air drumming``, ``root/applyeyemakeup/`` those of ``ApplyEyeMakeup``).
"""

from __future__ import annotations

import collections

import csv
import hashlib
import importlib.resources
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdmf_cache.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VIDEO_EXTS = (".avi", ".mp4", ".webm", ".mkv", ".mov")
FRAME_EXTS = (".jpg", ".jpeg", ".png")  # as the jpeg decoder reads them
#: Where the SSv2 download keeps its label names, looked for in --root and its parent.
SSV2_LABEL_FILES = ("labels.json", "labels/labels.json", "something-something-v2-labels.json")


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: where its split files live and how its classes are named.

    Attributes:
        name: CLI name.
        split_dir: sub-directory of the splits directory.
        files: split name -> file name.
        numeric_labels: classes are SSv2 label ids that need a names table.
        drop_stray: drop Kinetics-CMN's stray ids (``under_score`` duplicate classes, repeated class blocks).
    """

    name: str
    split_dir: str
    files: dict[str, str]
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


def shipped_splits_dir() -> Path:
    """The split files of the built-in datasets shipped with the package: ``mdmf_cache/data/splits``
    (holding ``ucf_ARN/``, ``hmdb_ARN/``, ``kinetics_CMN/``, ``ssv2_CMN/``, ``ssv2_OTAM/``), in a
    checkout and in an installed wheel alike."""
    return Path(str(importlib.resources.files(__package__) / "splits"))


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
        """(ids, paths, labels) of the entries ``resolve_paths`` found, in listing order (a fresh
        cache's rows; a cache that grew holds them in another row order, see ``store``)."""
        keep = [i for i, p in enumerate(self.paths) if p is not None]
        return [self.video_ids[i] for i in keep], [self.paths[i] for i in keep], self.labels[keep].astype(np.int32)


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def clean_class_name(name: str) -> str:
    """method.md §5 ``clean``: split CamelCase (lower-cased), underscores to spaces, drop SSv2
    brackets, squeeze spaces.

    ``ApplyEyeMakeup`` -> ``apply eye makeup``, ``brush_hair`` -> ``brush hair``,
    ``Bending [something] until it breaks`` -> ``Bending something until it breaks`` (names without
    CamelCase keep their case).
    """
    words = []
    for word in name.replace("_", " ").replace("[", "").replace("]", "").split():
        parts = _CAMEL.split(word)
        if len(parts) > 1:
            words.extend(p.lower() for p in parts)
        else:
            words.append(word)
    return " ".join(words)


def folder_key(name: str) -> str:
    """How a class folder is matched to a split file's class: case-insensitive, ``_`` = space."""
    return " ".join(name.replace("_", " ").split()).casefold()


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


def find_ssv2_labels(root: Path | None) -> Path | None:
    """The SSv2 download's labels file in ``root`` or its parent (``labels.json``,
    ``labels/labels.json``, ``something-something-v2-labels.json``), or None."""
    if root is None:
        return None
    root = Path(root)
    for base in (root, root.parent):
        for name in SSV2_LABEL_FILES:
            if (base / name).is_file():
                return base / name
    return None


def _ssv2_names(splits_dir: Path, root: Path | None, labels_file: Path | None = None) -> dict[str, str]:
    """SSv2 label id -> template text, from the user's labels file (``--labels``, else found beside
    ``--root``), over ``class_names.tsv``."""
    names: dict[str, str] = {}
    tsv = splits_dir / "class_names.tsv"
    if tsv.is_file():
        with tsv.open(encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                names[str(int(row["label_id"]))] = row["template"]
    path = Path(labels_file) if labels_file else find_ssv2_labels(root)
    if labels_file and not path.is_file():
        raise DatasetError(f"--labels {path} is not a file")
    if path is not None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            # SSv2 labels.json maps template -> id string.
            names.update({str(int(v)): k for k, v in data.items()})
        except (ValueError, AttributeError, TypeError) as e:
            raise DatasetError(f"{path}: not an SSv2 labels file ({{template: id}} JSON): {e}") from e
        log.info("SSv2 class names from %s", path)
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
                "%s: no class name for %d label ids (%s); pass --labels labels.json (from the SSv2 download) "
                "or put it in --root. Using 'label <id>'.",
                name, len(missing), ", ".join(missing[:5]),
            )
        class_names = [names.get(c, f"label {c}") for c in classes]
    else:
        class_names = list(classes)
    return Split(name, classes, class_names, list(lines), labels, source_hash)


def load_builtin_splits(dataset: str, splits_dir: Path | None = None, root: Path | None = None,
                        labels_file: Path | None = None) -> dict[str, Split]:
    """Parse the three split files of a built-in dataset.

    Args:
        dataset: a key of ``DATASETS``.
        splits_dir: directory holding ``<split_dir>/trainlist03.txt`` etc. (or the files themselves);
            None: the copies shipped with the package (:func:`shipped_splits_dir`).
        root: video root, only used to find SSv2's labels file.
        labels_file: SSv2 labels file (``--labels``); default: looked for beside ``root``.
    """
    spec = DATASETS[dataset]
    base = shipped_splits_dir() if splits_dir is None else Path(splits_dir)
    if (base / spec.split_dir).is_dir():
        base = base / spec.split_dir
    names = _ssv2_names(base, root, labels_file) if spec.numeric_labels else None
    out = {}
    for split, fname in spec.files.items():
        path = base / fname
        if not path.is_file():
            fix = ("the package's own copy is missing: reinstall mdmf-cache, or pass --splits DIR" if splits_dir is None
                   else f"--splits should point at the folder holding {spec.split_dir}/")
            raise DatasetError(f"{dataset}: split file {path} not found; {fix}")
        lines = read_split_file(path)
        if spec.drop_stray:
            lines = _drop_stray(lines)
        out[split] = _make_split(split, lines, spec.numeric_labels, names, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _scan_classes(root: Path) -> list[str]:
    """``class/video`` ids of the videos under ``root``; names that would collide keep what tells them
    apart (:func:`entry_ids`)."""
    ids = []
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        entries = [item for item in sorted(cdir.iterdir())
                   if (item.is_file() and item.suffix.lower() in VIDEO_EXTS) or (item.is_dir() and _has_frames(item))]
        ids.extend(f"{cdir.name}/{name}" for name in entry_ids(entries))
    return ids


def entry_ids(entries: list[Path]) -> list[str]:
    """The video part of each entry's id: the file's stem or the frame folder's name, unless two entries
    share it (``clip.mp4``, ``clip.avi``, ``clip/``): then ``clip.mp4``, ``clip.avi`` and ``clip/``."""
    stems = [e.name if e.is_dir() else os.path.splitext(e.name)[0] for e in entries]
    count = collections.Counter(stems)
    return [st if count[st] == 1 else (e.name + "/" if e.is_dir() else e.name) for st, e in zip(stems, entries)]


def scan_folder(root: Path) -> list[str]:
    """``class/video`` ids of a ``root/class/video.ext`` (or ``root/class/video/*.jpg``) tree, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"video root {root} is not a directory; pass --root DIR")
    ids = _scan_classes(root)
    if not ids:
        hint = ""
        subs = [d for d in sorted(root.iterdir()) if d.is_dir()]
        deeper = [d for d in subs if _scan_classes(d)]
        if deeper:
            hint = f"; the class folders look one level down: try --root {deeper[0]}"
        elif any(p.is_file() and p.suffix.lower() in VIDEO_EXTS for p in root.iterdir()):
            hint = f"; {root} holds the videos themselves: try --root {root.parent}"
        raise DatasetError(f"no videos under {root}: expected root/class/video.ext ({', '.join(VIDEO_EXTS)}){hint}")
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
        # the hash covers the split's classes, not its videos: videos added to or removed from the
        # tree keep the cache (rows are keyed by video id); a changed class set is another split
        out[split] = _make_split(split, lines, False, None, _sha256_lines(sorted(groups[split])))
    return out


def load_splits(dataset: str, splits_dir: Path | None, root: Path | None, seed: int = 0,
                labels_file: Path | None = None) -> dict[str, Split]:
    """Splits of a built-in dataset or of ``folder``; raises DatasetError naming valid datasets.

    ``splits_dir`` None: a built-in dataset reads the split files shipped with the package, ``folder``
    divides its classes with ``seed``.
    """
    if dataset == "folder":
        if root is None:
            raise DatasetError("dataset 'folder' needs --root DIR (a root/class/video.ext tree)")
        return load_folder_splits(root, splits_dir, seed)
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    return load_builtin_splits(dataset, splits_dir, root, labels_file)


class VideoIndex:
    """Finds the file or frame folder of each ``class/video`` id under a root, scanning it once.

    A split file's class matches a folder of the same name, else one whose :func:`folder_key` is
    the same (other case, ``_`` for spaces); SSv2's flat ``root/video`` layout is found by video name.
    An id names a file by its stem (``class/clip``), by its full name (``class/clip.mp4``), or a frame
    folder by its name (``class/clip``, or ``class/clip/``). A stem that names several entries
    (``clip.mp4``, ``clip.avi``, a frame folder ``clip/``) is ambiguous: :func:`resolve_paths` refuses it.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"video root {self.root} is not a directory; pass --root DIR")
        self.nested: dict[tuple[str, str], list[Path]] = {}  # (class folder, stem or folder name) -> entries
        self.exact: dict[tuple[str, str], Path] = {}  # (class folder, file name with extension) -> file
        self.flat: dict[str, list[Path]] = {}
        self.flat_exact: dict[str, Path] = {}
        self.folders: dict[str, list[str]] = {}  # folder_key -> class folder names
        for top in sorted(os.scandir(self.root), key=lambda e: e.name):
            if top.is_file():
                stem, ext = os.path.splitext(top.name)
                if ext.lower() in VIDEO_EXTS:
                    self.flat.setdefault(stem, []).append(Path(top.path))
                    self.flat_exact[top.name] = Path(top.path)
            elif top.is_dir():
                self.flat.setdefault(top.name, []).append(Path(top.path))  # may be a flat frame folder
                self.folders.setdefault(folder_key(top.name), []).append(top.name)
                for item in sorted(os.scandir(top.path), key=lambda e: e.name):
                    stem, ext = os.path.splitext(item.name)
                    if item.is_file() and ext.lower() in VIDEO_EXTS:
                        self.nested.setdefault((top.name, stem), []).append(Path(item.path))
                        self.exact[(top.name, item.name)] = Path(item.path)
                    elif item.is_dir():
                        self.nested.setdefault((top.name, item.name), []).append(Path(item.path))
        self.ambiguous: dict[str, list[Path]] = {}  # ids that name several entries (filled by resolve)

    def _pick(self, video_id: str, vid: str, by_stem: dict, exact: dict, key) -> Path | None:
        if vid.endswith("/"):  # a frame folder, named apart from files of the same stem
            cands = [p for p in by_stem.get(key(vid[:-1]), []) if p.is_dir()]
        elif key(vid) in exact:
            return exact[key(vid)]
        else:
            cands = by_stem.get(key(vid), [])
        if len(cands) > 1:  # a folder without frames is no video
            cands = [p for p in cands if not p.is_dir() or _has_frames(p)]
        if len(cands) > 1:
            self.ambiguous[video_id] = cands
        return cands[0] if len(cands) == 1 else None

    def resolve(self, video_id: str) -> Path | None:
        cls, vid = video_id.split("/", 1)
        if video_id in self.ambiguous:
            return None
        for folder in (cls, *[f for f in self.folders.get(folder_key(cls), ()) if f != cls]):
            path = self._pick(video_id, vid, self.nested, self.exact, lambda v, f=folder: (f, v))
            if path is not None or video_id in self.ambiguous:
                return path
        path = self._pick(video_id, vid, self.flat, self.flat_exact, lambda v: v)
        if path is not None and path.is_dir() and not _has_frames(path):
            path = None  # a class directory, not a frame folder
        return path


def _has_frames(folder: Path) -> bool:
    return any(os.path.splitext(n)[1].lower() in FRAME_EXTS for n in os.listdir(folder))


def resolve_paths(split: Split, root: Path, index: VideoIndex | None = None) -> list[str]:
    """Fill ``split.paths``; return the ids that were not found."""
    index = index or VideoIndex(root)
    split.paths = [index.resolve(v) for v in split.video_ids]
    ambiguous = [v for v in split.video_ids if v in index.ambiguous]
    if ambiguous:
        v = ambiguous[0]
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in index.ambiguous[v])
        cls = v.split("/", 1)[0]
        raise DatasetError(
            f"{split.name}: {len(ambiguous)} video ids name several files (first: {v} is {names} under "
            f"{index.ambiguous[v][0].parent}); one id must be one video: write the full name in the split file "
            f"(e.g. {cls}/{index.ambiguous[v][0].name}) or remove the copies")
    return [v for v, p in zip(split.video_ids, split.paths) if p is None]


def _listing(folder: Path) -> tuple[set[str], set[str]]:
    """(folder_keys of sub-folders, stems of the entries in the folder and in its sub-folders)."""
    keys, stems = set(), set()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return keys, stems
    stems.update(os.path.splitext(e.name)[0] for e in entries)
    for sub in (e for e in entries if e.is_dir()):
        keys.add(folder_key(sub.name))
        try:
            stems.update(os.path.splitext(e.name)[0] for e in os.scandir(sub.path))
        except OSError:
            pass
    return keys, stems


def diagnose_missing(video_ids: list[str], root: Path, dataset: str = "") -> str:
    """The likely reason the videos of ``video_ids`` are not under ``root``, as a hint ('' if none seen).

    Looks for the class folders one level below ``root`` (--root is the parent) or beside it
    (--root is a class folder), and for class folders that exist but hold differently named videos.
    """
    root = Path(root)
    if not root.is_dir():
        return f"{root} is not a directory"
    classes = {folder_key(v.split("/", 1)[0]) for v in video_ids}
    stems = {v.split("/", 1)[1] for v in video_ids}

    def hits(folder: Path) -> int:
        keys, found = _listing(folder)
        return len(classes & keys) + len(stems & found)

    here_keys, here_stems = _listing(root)
    if classes & here_keys and not stems & here_stems:
        example = next(v for v in video_ids if folder_key(v.split("/", 1)[0]) in here_keys)
        if {s.casefold() for s in stems} & {s.casefold() for s in here_stems}:
            return (f"the class folders are there, the video names differ in case from the split files' "
                    f"(e.g. {example}): rename the files or fix the lists")
        return (f"the class folders are there but hold no video the split files name (e.g. {example}.*): "
                "are these the same dataset and split files?")
    candidates = [Path(e.path) for e in os.scandir(root) if e.is_dir()]
    below = max(candidates, key=hits, default=None)
    if below is not None and hits(below) > 0:
        return f"the class folders are one level down: try --root {below}"
    if hits(root.parent) > 0 and root.parent != root:
        return f"{root} looks like one class folder: try --root {root.parent}"
    example = next(iter(sorted(classes)))
    seen = sorted(here_keys)[:3]
    return (f"no class folder matches the split files (e.g. {example!r}); {root} holds "
            f"{', '.join(repr(s) for s in seen) if seen else 'no folders'}")
