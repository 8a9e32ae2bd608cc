"""Split files, class maps and video resolution (docs/method.md §2)."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mdmf_cache.data.datasets import (DATASETS, SPLITS, VideoIndex, clean_class_name, load_folder_splits, load_splits,
                                      read_split_file, resolve_paths)
from mdmf_cache.errors import DatasetError

# method.md §2: classes and videos per split (train, val, test).
EXPECTED = {
    "ucf101": ((70, 10, 21), (9154, 1421, 2745)),
    "hmdb51": ((31, 10, 10), (4280, 1194, 1292)),
    "kinetics100": ((64, 12, 24), (6400, 1200, 2400)),
    "ssv2-small": ((64, 12, 24), (6400, 1200, 2400)),
    "ssv2-full": ((64, 12, 24), (67013, 1926, 2857)),
}


@pytest.fixture(scope="module")
def real_splits(splits_dir):
    """Every built-in dataset's splits, parsed once (SSv2-Full's train list has 67k lines)."""
    return {name: load_splits(name, splits_dir, None) for name in EXPECTED}


# ---- the real split files -------------------------------------------------------------------
@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_counts_match_spec(real_splits, dataset):
    splits = real_splits[dataset]
    classes, videos = EXPECTED[dataset]
    assert tuple(len(splits[s].classes) for s in SPLITS) == classes
    assert tuple(len(splits[s]) for s in SPLITS) == videos


@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_class_disjoint_and_labels_index_sorted_classes(real_splits, dataset):
    splits = real_splits[dataset]
    sets = [set(splits[s].classes) for s in SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    numeric = DATASETS[dataset].numeric_labels
    for s in SPLITS:
        sp = splits[s]
        assert sp.classes == sorted(set(sp.classes), key=int if numeric else None)
        assert len(sp.class_names) == len(sp.classes)
        keys = np.array([v.split("/", 1)[0] for v in sp.video_ids])
        assert np.array_equal(np.asarray(sp.classes)[sp.labels], keys)
        assert set(sp.labels.tolist()) == set(range(len(sp.classes)))  # every class has videos
        assert len(set(sp.video_ids)) == len(sp.video_ids)


def test_split_hashes_identify_the_files(real_splits):
    hashes = [real_splits[d][s].source_hash for d in EXPECTED for s in SPLITS]
    assert len(set(hashes)) == len(hashes)
    assert all(len(h) == 64 for h in hashes)


def test_kinetics_strays_dropped(real_splits, splits_dir):
    splits = real_splits["kinetics100"]
    for s in SPLITS:
        counts = Counter(splits[s].labels.tolist())
        assert set(counts.values()) == {100}, s  # CMN: 100 videos per class
        assert not any("_" in c and c.replace("_", " ") in splits[s].classes for c in splits[s].classes)
    raw = read_split_file(splits_dir / "kinetics_CMN" / "trainlist03.txt")
    assert len(raw) == 6400 + 174  # the file really carries strays, and they go
    assert splits["train"].video_ids == raw[:6400]  # the clean part is the 64 leading blocks
    # test comes from the clean list, which equals the raw test list with its strays removed
    assert splits["test"].video_ids == read_split_file(splits_dir / "kinetics_CMN" / "testlist03_bb.txt")
    from mdmf_cache.data.datasets import _drop_stray

    assert _drop_stray(read_split_file(splits_dir / "kinetics_CMN" / "testlist03.txt")) == splits["test"].video_ids


def test_ssv2_full_names_from_table(real_splits, splits_dir):
    splits = real_splits["ssv2-full"]
    with (splits_dir / "ssv2_OTAM" / "class_names.tsv").open(encoding="utf-8") as f:
        table = {str(int(r["label_id"])): (r["split"], r["template"]) for r in csv.DictReader(f, delimiter="\t")}
    for s in ("train", "test"):
        sp = splits[s]
        assert all(table[c][0] == s for c in sp.classes)
        assert sp.class_names == [table[c][1] for c in sp.classes]
        assert sp.classes != sorted(sp.classes)  # sorted as numbers, not strings ("11" after "7")
    assert splits["train"].class_names[:2] == ["Bending [something] until it breaks", "Closing [something]"]
    # val ids are not in the table: placeholder names, never a crash
    assert all(n == f"label {c}" for c, n in zip(splits["val"].classes, splits["val"].class_names))


def test_ssv2_full_names_from_user_labels_json(real_splits, splits_dir, tmp_path, caplog):
    val_ids = real_splits["ssv2-full"]["val"].classes
    labels = {f"Template number {i}": str(i) for i in map(int, val_ids)}
    labels["Overridden [something]"] = "3"  # labels.json wins over the table
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with caplog.at_level(logging.WARNING):
        splits = load_splits("ssv2-full", splits_dir, tmp_path)
    assert splits["val"].class_names == [f"Template number {c}" for c in splits["val"].classes]
    assert "no class name" not in caplog.text
    assert splits["train"].class_names[splits["train"].classes.index("3")] == "Overridden [something]"


def test_builtin_errors(splits_dir, tmp_path):
    with pytest.raises(DatasetError, match="ucf101.*folder"):
        load_splits("ucf", splits_dir, None)
    with pytest.raises(DatasetError, match="not found.*--splits should point at the folder holding ucf_ARN/"):
        load_splits("ucf101", tmp_path, None)
    bad = tmp_path / "bad.txt"
    bad.write_text("a/b\n\nno_slash_here\n")
    with pytest.raises(DatasetError, match="no_slash_here"):
        read_split_file(bad)


def test_builtin_splits_default_to_the_shipped_files(real_splits, splits_dir, tmp_path, monkeypatch):
    """No splits folder: the package's own copies, from any working directory; --splits DIR overrides."""
    import mdmf_cache.data.datasets as datasets

    assert splits_dir == Path(datasets.__file__).parent / "splits"
    monkeypatch.chdir(tmp_path)
    default = load_splits("ucf101", None, None)
    for s in SPLITS:
        assert default[s].video_ids == real_splits["ucf101"][s].video_ids
        assert default[s].source_hash == real_splits["ucf101"][s].source_hash
    own = tmp_path / "mine" / "ucf_ARN"  # a user's own lists in the same layout win over the shipped ones
    own.mkdir(parents=True)
    for s, fname in DATASETS["ucf101"].files.items():
        (own / fname).write_text(f"{s}Class/v_{s}_1\n{s}Class/v_{s}_2\n")
    mine = load_splits("ucf101", own.parent, None)
    assert [mine[s].video_ids for s in SPLITS] == [[f"{s}Class/v_{s}_1", f"{s}Class/v_{s}_2"] for s in SPLITS]


def test_missing_shipped_split_file_says_reinstall(tmp_path, monkeypatch):
    import mdmf_cache.data.datasets as datasets

    monkeypatch.setattr(datasets, "shipped_splits_dir", lambda: tmp_path)
    with pytest.raises(DatasetError, match="package's own copy is missing: reinstall"):
        load_splits("hmdb51", None, None)


def test_read_split_file_skips_blank_lines(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("\n a/1 \n\nb/2\n\n")
    assert read_split_file(f) == ["a/1", "b/2"]


# ---- folder datasets ------------------------------------------------------------------------
def _fake_tree(root: Path, classes: int = 10, per_class: int = 3) -> list[str]:
    ids = []
    for c in range(classes):
        for v in range(per_class):
            (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
            (root / f"class{c:02d}" / f"vid{v}.mp4").write_bytes(b"")
            ids.append(f"class{c:02d}/vid{v}")
    return ids


def test_folder_splits_class_disjoint_and_seeded(tmp_path):
    ids = _fake_tree(tmp_path, classes=10)
    a = load_folder_splits(tmp_path, seed=0)
    assert [len(a[s].classes) for s in SPLITS] == [6, 2, 2]
    cls = [set(a[s].classes) for s in SPLITS]
    assert not (cls[0] & cls[1] or cls[0] & cls[2] or cls[1] & cls[2])
    assert sorted(v for s in SPLITS for v in a[s].video_ids) == sorted(ids)
    for s in SPLITS:
        assert np.array_equal(np.asarray(a[s].classes)[a[s].labels], [v.split("/")[0] for v in a[s].video_ids])
    again = load_folder_splits(tmp_path, seed=0)
    assert all(again[s].video_ids == a[s].video_ids and again[s].source_hash == a[s].source_hash for s in SPLITS)
    others = [load_folder_splits(tmp_path, seed=k)["test"].classes for k in (1, 2, 3)]
    assert any(o != a["test"].classes for o in others)  # the seed decides the partition


def test_folder_needs_three_classes(tmp_path):
    _fake_tree(tmp_path, classes=2)
    with pytest.raises(DatasetError, match="3 classes"):
        load_folder_splits(tmp_path)
    with pytest.raises(DatasetError, match="not a directory"):
        load_folder_splits(tmp_path / "nope")


def test_folder_user_split_files(tmp_path):
    _fake_tree(tmp_path / "videos", classes=3)
    sd = tmp_path / "lists"
    sd.mkdir()
    (sd / "trainlist03.txt").write_text("class00/vid0\nclass00/vid1\n")
    (sd / "val.txt").write_text("class01/vid0\n")
    (sd / "testlist03.txt").write_text("class02/vid2\nclass02/vid0\n")
    splits = load_splits("folder", sd, tmp_path / "videos")
    assert splits["test"].video_ids == ["class02/vid2", "class02/vid0"]  # file order kept
    assert splits["val"].classes == ["class01"]
    (sd / "val.txt").unlink()
    with pytest.raises(DatasetError, match="vallist03.txt"):
        load_splits("folder", sd, tmp_path / "videos")


# ---- resolving ids to files -----------------------------------------------------------------
def test_video_index_layouts(tmp_path):
    root = tmp_path
    (root / "Archery").mkdir()
    (root / "Archery" / "v_Archery_g01_c01.avi").write_bytes(b"")  # UCF: root/class/video.avi
    (root / "Archery" / "v_Archery_g01_c02.AVI").write_bytes(b"")  # extension case
    (root / "195025.webm").write_bytes(b"")  # SSv2 download: root/video.webm
    (root / "brush_hair" / "April_09_brush_hair").mkdir(parents=True)  # nested JPEG frames
    (root / "brush_hair" / "April_09_brush_hair" / "img_00001.jpg").write_bytes(b"")
    (root / "51958").mkdir()  # flat frame folder (SSv2 frames)
    (root / "51958" / "000001.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not a video")
    idx = VideoIndex(root)
    assert idx.resolve("Archery/v_Archery_g01_c01") == root / "Archery" / "v_Archery_g01_c01.avi"
    assert idx.resolve("Archery/v_Archery_g01_c02") == root / "Archery" / "v_Archery_g01_c02.AVI"
    assert idx.resolve("126/195025") == root / "195025.webm"
    assert idx.resolve("Pouring something into something/195025") == root / "195025.webm"
    assert idx.resolve("brush_hair/April_09_brush_hair") == root / "brush_hair" / "April_09_brush_hair"
    assert idx.resolve("Pouring something into something/51958") == root / "51958"
    assert idx.resolve("x/Archery") is None  # a class folder is not a frame folder
    assert idx.resolve("Archery/v_missing") is None
    assert idx.resolve("x/notes") is None
    with pytest.raises(DatasetError):
        VideoIndex(root / "missing")


def test_resolve_paths_reports_missing(tmp_path):
    ids = _fake_tree(tmp_path / "v", classes=3, per_class=2)
    lists = tmp_path / "lists"
    lists.mkdir()
    for s, c in zip(SPLITS, ("class00", "class01", "class02")):
        (lists / f"{s}.txt").write_text(f"{c}/vid0\n{c}/gone\n{c}/vid1\n")
    splits = load_splits("folder", lists, tmp_path / "v")
    missing = resolve_paths(splits["val"], tmp_path / "v")
    assert missing == ["class01/gone"]
    assert splits["val"].paths == [tmp_path / "v" / "class01" / "vid0.mp4", None, tmp_path / "v" / "class01" / "vid1.mp4"]
    assert len(ids) == 6


@pytest.mark.parametrize("raw, clean", [
    ("brush_hair", "brush hair"),
    ("Pouring [something] into [something]", "Pouring something into something"),
    ("  playing  ice_hockey ", "playing ice hockey"),
    ("ApplyEyeMakeup", "apply eye makeup"),  # UCF101 CamelCase (method.md §5)
    ("YoYo", "yo yo"),
    ("HandstandPushups", "handstand pushups"),
    ("Skiing", "Skiing"),
    ("Bending [something] until it breaks", "Bending something until it breaks"),
])
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


# ---- where users keep things ------------------------------------------------------------
def test_class_folders_match_case_insensitively_and_underscores(tmp_path):
    for rel in ("air_drumming/-VtLx.mp4", "applyeyemakeup/v_1.avi", "Brush Hair/b1.mov", "Brush_Hair/b2.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    idx = VideoIndex(tmp_path)
    assert idx.resolve("air drumming/-VtLx") == tmp_path / "air_drumming" / "-VtLx.mp4"
    assert idx.resolve("ApplyEyeMakeup/v_1") == tmp_path / "applyeyemakeup" / "v_1.avi"
    assert idx.resolve("Brush Hair/b1") == tmp_path / "Brush Hair" / "b1.mov"  # exact name first
    assert idx.resolve("Brush Hair/b2") == tmp_path / "Brush_Hair" / "b2.mp4"  # then the look-alike folder
    assert idx.resolve("air drumming/other") is None


def test_kinetics_mmaction2_layout_found(real_splits, tmp_path):
    """mmaction2 keeps Kinetics as ``air_drumming/<id>.mp4``: every val video resolves."""
    val = real_splits["kinetics100"]["val"]
    for vid in val.video_ids:
        cls, name = vid.split("/", 1)
        (tmp_path / cls.replace(" ", "_")).mkdir(exist_ok=True)
        (tmp_path / cls.replace(" ", "_") / f"{name}.mp4").write_bytes(b"")
    assert resolve_paths(val, tmp_path) == []


def test_diagnose_missing_names_the_likely_cause(tmp_path):
    from mdmf_cache.data.datasets import diagnose_missing

    ids = ["ApplyEyeMakeup/v_1", "Archery/v_2"]
    for rel in ("UCF-101/ApplyEyeMakeup/v_1.avi", "UCF-101/Archery/v_2.avi"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert diagnose_missing(ids, tmp_path) == f"the class folders are one level down: try --root {tmp_path / 'UCF-101'}"
    assert "looks like one class folder: try --root " + str(tmp_path / "UCF-101") in \
        diagnose_missing(ids, tmp_path / "UCF-101" / "Archery")
    assert "hold no video the split files name" in diagnose_missing(["Archery/v_9"], tmp_path / "UCF-101")
    assert "video names differ in case" in diagnose_missing(["archery/V_2"], tmp_path / "UCF-101")
    other = tmp_path / "other"
    (other / "Basketball").mkdir(parents=True)
    assert "no class folder matches the split files (e.g. 'applyeyemakeup'); " in diagnose_missing(ids, other)


def test_folder_split_hash_follows_classes_not_videos(tmp_path):
    """Videos added to a folder tree keep its split (and cache); a new class is another split."""
    _fake_tree(tmp_path, classes=5, per_class=2)
    before = load_folder_splits(tmp_path)
    (tmp_path / "class00" / "vid9.mp4").write_bytes(b"")
    grown = load_folder_splits(tmp_path)
    assert all(grown[s].source_hash == before[s].source_hash for s in SPLITS)
    assert sum(len(grown[s]) for s in SPLITS) == sum(len(before[s]) for s in SPLITS) + 1
    (tmp_path / "class99").mkdir()
    (tmp_path / "class99" / "v.mp4").write_bytes(b"")
    assert any(load_folder_splits(tmp_path)[s].source_hash != before[s].source_hash for s in SPLITS)


def test_folder_scan_hints_one_level_off(tmp_path):
    _fake_tree(tmp_path / "dataset" / "videos", classes=3)
    with pytest.raises(DatasetError, match="one level down: try --root .*videos"):
        load_folder_splits(tmp_path / "dataset")


@pytest.mark.parametrize("where", ["labels/labels.json", "something-something-v2-labels.json", "../labels.json",
                                   "--labels"])
def test_ssv2_labels_found_where_the_download_puts_them(splits_dir, tmp_path, where):
    root = tmp_path / "data" / "20bn-something-something-v2"
    root.mkdir(parents=True)
    val = load_splits("ssv2-full", splits_dir, None)["val"]
    data = {f"Template {c}": c for c in val.classes}
    target = tmp_path / "elsewhere.json" if where == "--labels" else root / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    splits = load_splits("ssv2-full", splits_dir, root, labels_file=target if where == "--labels" else None)
    assert splits["val"].class_names == [f"Template {c}" for c in splits["val"].classes]
    with pytest.raises(DatasetError, match="--labels .* is not a file"):
        load_splits("ssv2-full", splits_dir, root, labels_file=tmp_path / "nope.json")
