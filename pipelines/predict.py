"""Recipe ``mdmf-cache predict``: label new videos with a trained run and a few labelled videos per class.

Top to bottom:
    1. the config (:class:`~mdmf_cache.configs.PredictConfig`) and the inputs, all checked before anything
       is loaded or written: the run directory, ``SUPPORT/<class>/<video>``, the query videos (a warning when one
       is also a support: the same file, or a copy), the backbone the run's features came from
       (:func:`mdmf_cache.prediction.inputs.run_backbone`);
    2. extract: the support and query videos' frame features with that backbone and the run's test-time
       settings, cached (:class:`mdmf_cache.prediction.inputs.PredictCache`: a second call with the same
       videos loads no backbone; new videos are extracted alone), with a token head's SPEC their token arrays
       too, and the class prompts' text embeddings;
    3. score every query against the support classes with the run's head
       (:func:`mdmf_cache.prediction.scoring.class_probabilities`: one episode per query, K shots per class,
       softmax probabilities averaged over K-subsets when classes have more supports than K; a transductive head
       sees no other query, which a warning says; a token head reads the videos' tokens through a bounded
       reader, ``--token-cache-mb``);
    4. write ``predict_config.json`` and ``predictions.csv`` (query, predicted class, one probability
       column per class), each atomically;
    5. print the first queries and the count per predicted class.

The rules are in docs/predict.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache import heads as head_registry
from mdmf_cache.configs import PredictConfig
from mdmf_cache.data.datasets import Split
from mdmf_cache.errors import DatasetError
from mdmf_cache.fileio import atomic_write_json, atomic_write_text
from mdmf_cache.prediction.inputs import (PredictCache, find_queries, find_support, queries_among_supports, run_backbone,
                                          usable_supports)
from mdmf_cache.report.tables import print_predictions
from mdmf_cache.heads.factory import load_head
from mdmf_cache.store.runs import check_identity, read_run_config, run_cache

log = logging.getLogger(__name__)

#: predictions.csv's first columns; the class columns follow.
COLUMNS = ("query", "predicted")


def run(cfg: PredictConfig, progress: bool = True, show: bool = True) -> dict[str, Any]:
    """Predict, write and print; returns what was written (rows, counts) and what the cache did.

    Raises:
        ConfigError: bad options; RUN is not a run directory; its backbone cannot be found or loaded.
        DatasetError: no support class folder with videos, fewer than 2 classes, a support class with no
            decodable video, no query video (or none decodable).
    """
    import torch

    from mdmf_cache.device import resolve_device
    from mdmf_cache.extraction.embed import prompts_for
    from mdmf_cache.prediction.scoring import class_probabilities, support_subsets

    # 1. config and inputs
    cfg.validate()
    run_dir = Path(cfg.run)
    run_cfg = read_run_config(run_dir)
    if cfg.cache:  # a moved cache stands in for the run's only if it is the same cache (as eval --cache)
        check_identity(run_cfg.get("cache_identity"), run_cache(run_dir, run_cfg, cfg.cache), f"predict {run_dir} --cache")
    support = find_support(cfg.support)
    classes = list(support)
    clash = [c for c in classes if c in COLUMNS]
    if clash:
        raise DatasetError(f"support class folder {clash[0]!r} has the name of a predictions.csv column; rename it")
    queries = find_queries(cfg.query)
    among = queries_among_supports(support, queries)
    if among:
        q, c, v, how = among[0]
        more = f" ({len(among) - 1} more queries are supports too)" if len(among) > 1 else ""
        log.warning("query %s is support %s of class %s (%s)%s: its prediction is no test of the run", q, v, c, how,
                    more)
    backbone = run_backbone(run_dir, run_cfg, cfg)
    head, _ = load_head(run_dir, cfg.device)
    if head_registry.get(head.method).transductive:
        log.warning("%s is transductive, but predict scores one query per episode: each answer is the head's with "
                    "that query alone (its released test episodes have one query per class), whatever else is "
                    "labelled (docs/predict.md)", head.method)
    device = resolve_device(cfg.device)
    log.info("%d support classes (%s), %d queries; backbone %s", len(classes),
             ", ".join(f"{c}: {len(v)}" for c, v in support.items()), len(queries), backbone.what)

    # 2. extract (or read back) the features; the prompts' text embeddings
    cache = PredictCache(Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "predict_cache", backbone, progress)
    videos = list(dict.fromkeys(p.resolve() for p in [*(v for vs in support.values() for v in vs), *queries]))
    feats = cache.features(videos)
    row = {v: i for i, v in enumerate(videos)}
    errors = {p: feats.errors[row[p.resolve()]] for p in [*(v for vs in support.values() for v in vs), *queries]}
    support = usable_supports(support, errors)
    good = [q for q in queries if not errors[q]]
    failed = [q for q in queries if errors[q]]
    for q in failed:
        log.warning("query %s could not be decoded (%s); its row in predictions.csv is empty", q, errors[q])
    if not good:
        raise DatasetError(f"none of the {len(queries)} query videos could be decoded (e.g. {failed[0]}: "
                           f"{errors[failed[0]]})")
    prompts = prompts_for(Split("support", classes, classes, [], np.zeros(0, dtype=np.int32), ""), backbone.ecfg)
    text = cache.text(prompts)

    # 3. score
    def tensor(paths: list[Path]) -> torch.Tensor:
        return torch.from_numpy(feats.features[[row[p.resolve()] for p in paths]]).to(device)  # (R, T, D) float16

    shot, passes = support_subsets([len(support[c]) for c in classes], cfg.shot, cfg.subsets, cfg.seed)
    if shot != int(run_cfg.get("shot", shot)):
        log.info("K=%d supports per class; the run was trained for %s-shot", shot, run_cfg.get("shot"))
    reader = cache.tokens(cfg.token_cache_mb << 20) if backbone.tokens else None  # a token head's, bounded
    try:
        tokens = {}
        if reader is not None:
            def token_rows(paths: list[Path]) -> np.ndarray:
                return feats.rows[[row[p.resolve()] for p in paths]]

            def query_tokens(lo: int, hi: int) -> torch.Tensor:  # (hi - lo, T, L, P, Dt), the next batch prefetched
                reader.prefetch(token_rows(good[hi:hi + cfg.batch_size]))
                rows = token_rows(good[lo:hi])
                return torch.from_numpy(reader.read(rows, np.zeros_like(rows)))

            tokens = {"support_tokens": [torch.from_numpy(reader.read(r, np.zeros_like(r)))
                                         for r in (token_rows(support[c]) for c in classes)],  # (K_c, T, L, P, Dt)
                      "query_tokens": query_tokens}
        probs = class_probabilities(head, [tensor(support[c]) for c in classes], tensor(good),
                                    torch.from_numpy(text).to(device), shot=cfg.shot, subsets=cfg.subsets,
                                    seed=cfg.seed, pps_test=cfg.pps_test, query_keys=[str(q.resolve()) for q in good],
                                    batch_size=cfg.batch_size, **tokens).numpy()  # (Q, N)
    finally:
        if reader is not None:
            reader.close()

    # 4. write
    by_query = dict(zip(good, probs))
    rows = []
    for q in queries:
        p = by_query.get(q)
        rows.append({"query": str(q), "predicted": classes[int(p.argmax())] if p is not None else "",
                     "probability": float(p.max()) if p is not None else None, "probs": p})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*COLUMNS, *classes])
    for r in rows:
        writer.writerow([r["query"], r["predicted"], *(r["probs"].tolist() if r["probs"] is not None else [""] * len(classes))])
    out = Path(cfg.out) if cfg.out else run_dir / "predict"
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"classes": classes, "prompts": prompts, "supports": {c: len(support[c]) for c in classes},
                "shot": shot, "passes": len(passes), "backbone": backbone.what, "weights": backbone.weights,
                "cache": str(cache.path), "method": head.method}
    atomic_write_json(out / "predict_config.json", {**dataclasses.asdict(cfg), "resolved": resolved})
    atomic_write_text(out / "predictions.csv", buf.getvalue())

    # 5. print
    res = {**resolved, "rows": rows, "failed": [str(q) for q in failed], "csv": str(out / "predictions.csv"),
           "out": str(out), "counts": {c: sum(r["predicted"] == c for r in rows) for c in classes},
           "extracted": feats.extracted, "backbone_loaded": cache.backbone_loaded}
    if show:
        print_predictions(res, cfg.show)
    return res
