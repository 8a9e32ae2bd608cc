"""Numbers the papers report, for tables that set a measured result beside them (docs/method.md §11).

:data:`REPORTED` holds Tables 1-2 of the CLIP-MDMF paper: 5-way accuracy (%) per method, backbone,
dataset and shot, plus the numbers a head's own release reports in its README (Chamfer++, on R(2+1)D features; STRM, on ResNet-50). The OTAM, TRX, HyRSM and MoLo rows were measured on an ImageNet ResNet-50, not on
CLIP; the backbone travels with every number so that a table never shows one as a CLIP result.
Where the CLIP-MDMF paper marks a number as its own re-implementation and the original paper
published another, :data:`PUBLISHED` holds the original's.

A few heads that the CLIP-MDMF paper does not list have rows from their own authors' release;
:data:`SOURCES` names where each method's rows come from (the CLIP-MDMF paper where it is not listed).
"""

from __future__ import annotations

__all__ = ["REPORTED", "PUBLISHED", "SOURCES", "reported", "backbone_of", "DATASET_LABELS"]

DATASET_LABELS = {"hmdb51": "HMDB51", "ucf101": "UCF101", "kinetics100": "Kinetics-100", "ssv2-full": "SSv2-Full",
                  "ssv2-small": "SSv2-Small"}
_ORDER = ("hmdb51", "ucf101", "kinetics100", "ssv2-full", "ssv2-small")
_RN = "ResNet-50 (ImageNet)"
_R21D = "R(2+1)D-34 (TSL's per-dataset fine-tuned features)"


def _rows(method: str, backbone: str, *per_dataset: tuple[float | None, float | None, float | None]):
    return {(method, backbone, ds, shot): acc for ds, accs in zip(_ORDER, per_dataset)
            for shot, acc in zip((1, 3, 5), accs) if acc is not None}


#: (method, backbone, dataset, shot) -> 5-way accuracy %, CLIP-MDMF paper Tables 1-2.
REPORTED: dict[tuple[str, str, str, int], float] = {
    **_rows("otam", _RN, (54.6, None, 66.1), (79.9, None, 88.9), (73.0, None, 85.5), (42.8, None, 52.3), (38.9, None, 48.1)),
    **_rows("trx", _RN, (52.9, None, 75.6), (77.3, None, 96.1), (63.4, None, 85.1), (42.0, None, 63.0), (36.0, None, 56.3)),
    **_rows("hyrsm", _RN, (60.3, 71.7, 76.0), (83.9, 93.0, 94.7), (73.7, 83.5, 86.1), (54.3, 65.1, 69.0), (40.6, 52.3, 56.1)),
    **_rows("molo", _RN, (60.8, 72.0, 77.4), (86.0, 93.5, 95.5), (74.0, 83.7, 85.6), (56.6, 67.0, 70.6), (42.7, 52.9, 56.4)),
    **_rows("clip-fsar", "CLIP-RN50", (69.4, 78.3, 80.7), (92.4, 95.4, 97.0), (90.1, 90.8, 91.6), (58.7, 60.7, 62.9),
            (52.1, 54.0, 55.3)),
    **_rows("clip-fsar", "CLIP-ViT-B/16", (77.1, 84.1, 87.7), (97.0, 98.6, 99.1), (94.8, 95.0, 95.4), (62.1, 68.3, 72.1),
            (54.6, 59.4, 61.8)),
    **_rows("mdmf", "CLIP-RN50", (66.8, 79.4, 83.0), (94.3, 98.0, 98.8), (90.1, 92.0, 93.5), (56.9, 63.9, 68.0),
            (52.3, 56.3, 60.4)),
    **_rows("mdmf", "CLIP-ViT-B/16", (77.1, 84.1, 88.0), (97.0, 98.1, 99.3), (95.0, 95.1, 96.2), (60.1, 68.9, 72.7),
            (54.0, 59.8, 62.8)),
    # Chamfer++ (the chamfer head's default), from its release's MODEL_ZOO.md (jbertrand89/temporal_matching; mean of
    # three seeds): TSL's splits, whose Kinetics-100 is CMN's and whose SSv2 is OTAM's (SSv2-Full). Its UCF101
    # numbers are on TSL's own 64/12/24-class split, not ARN's, and are left out.
    **_rows("chamfer", _R21D, (None, None, None), (None, None, None), (96.1, None, 98.3), (67.8, None, 81.6),
            (None, None, None)),
    # CLIP-MEI: the "Results" tables of its authors' README (D-XH/CLIP-MEI), "CLIP-RN50" and "CLIP-VIT" (the code's
    # only ViT is ViT-B/16); "Kinetics" is the CMN Kinetics-100 split, "SSv2-FULL" the OTAM split; no SSv2-Small row.
    **_rows("clip-mei", "CLIP-RN50", (76.4, 83.0, 84.9), (93.7, 97.0, 97.5), (90.1, 92.9, 93.6), (61.6, 65.9, 68.5),
            (None, None, None)),
    # STRM: the "Results" table of its authors' README (Anirudh257/strm), 5-way 5-shot, ImageNet ResNet-50 fine-tuned
    # end to end; "Kinetics" is CMN's Kinetics-100 split, "SSv2" OTAM's (SSv2-Full), HMDB and UCF ARN's. No 1-shot row.
    **_rows("strm", _RN, (None, None, 77.3), (None, None, 96.8), (None, None, 86.7), (None, None, 68.1),
            (None, None, None)),
    **_rows("clip-mei", "CLIP-ViT-B/16", (75.9, 85.9, 88.5), (94.9, 98.2, 98.9), (87.7, 95.3, 96.0), (67.8, 76.6, 79.8),
            (None, None, None)),
}

#: Where a method's :data:`REPORTED` rows come from, when not from the CLIP-MDMF paper's Tables 1-2.
SOURCES: dict[str, str] = {
    "clip-mei": "D-XH/CLIP-MEI README (Deng et al., KBS 2025), 5-way, 1 query per class per test episode",
    "chamfer": "jbertrand89/temporal_matching MODEL_ZOO.md (Chamfer++, R(2+1)D features, mean of three seeds)",
    # no rows: the release's README reports no accuracy, and the ECCV 2024 paper's tables are not transcribed here
    "emp-net": "none: cong-wu/EMP-Net's README reports no accuracies (Wu et al., ECCV 2024, has its own tables)",
    "molo": "the CLIP-MDMF paper's Tables 1-2, quoting MoLo (Wang et al., CVPR 2023) on an ImageNet ResNet-50 "
            "fine-tuned end to end; the release (alibaba-mmai-research/CLIP-FSAR) publishes no numbers of its own",
    "strm": "Anirudh257/strm README (Thatipelli et al., CVPR 2022), 5-way 5-shot, ImageNet ResNet-50 fine-tuned end to end",
}

#: Where the CLIP-MDMF paper re-implemented a method and gives the original paper's number in parentheses.
PUBLISHED: dict[tuple[str, str, str, int], float] = {
    ("trx", _RN, "kinetics100", 1): 63.6, ("trx", _RN, "kinetics100", 5): 85.9, ("trx", _RN, "ssv2-full", 5): 64.6,
    ("trx", _RN, "ssv2-small", 5): 59.4, ("clip-fsar", "CLIP-RN50", "kinetics100", 5): 92.0,
    ("clip-fsar", "CLIP-RN50", "ssv2-full", 5): 62.8, ("clip-fsar", "CLIP-RN50", "ssv2-small", 5): 55.8,
}

#: The backbone a method's CLIP-MDMF-paper numbers were measured on when it is not this cache's CLIP.
_NOT_CLIP = {"otam": _RN, "trx": _RN, "hyrsm": _RN, "molo": _RN, "chamfer": _R21D, "strm": _RN}


def backbone_of(model: str) -> str:
    """The papers' name of a cache's open_clip model: ``RN50`` -> ``CLIP-RN50``, ``ViT-B-16`` -> ``CLIP-ViT-B/16``."""
    return {"RN50": "CLIP-RN50", "ViT-B-16": "CLIP-ViT-B/16"}.get(model, f"CLIP-{model}")


def reported(method: str, dataset: str, shot: int, model: str) -> tuple[float, str] | None:
    """The reported accuracy of ``method`` on ``dataset`` at ``shot`` and the backbone it was measured on: the
    cache's CLIP backbone for CLIP methods, ImageNet ResNet-50 for the others; None when the paper has none."""
    backbone = _NOT_CLIP.get(method, backbone_of(model))
    acc = REPORTED.get((method, backbone, dataset, shot))
    return None if acc is None else (acc, backbone)
