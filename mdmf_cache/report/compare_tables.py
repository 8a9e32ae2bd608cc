"""A comparison's table (``mdmf-cache compare``): its rows from the per-episode scores, and ``table.md``,
``table.csv`` and ``table.tex``.

A row per method: per shot the mean accuracy over the saved test episodes with its 95% CI, over training seeds their
mean and spread, the paired difference to the reference method (per seed and overall), the accuracy keeping the best
checkpoint on test would have claimed (``--test-selected``), and the papers' reported numbers with their backbone.
``cfg`` is the recipe's ``CompareConfig`` (read by attribute: this engine does not import the recipe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache import heads

__all__ = ["transductive", "test_queries", "list_name", "table_rows", "params_text", "table_notes", "markdown_table", "latex_table",
           "write_tables"]


def transductive(method: str) -> bool:
    """A registered head whose logits of a query depend on the episode's other queries (``SPEC.transductive``)."""
    return method in heads.REGISTRY and heads.get(method).transductive


def test_queries(method: str, shot: int) -> int:
    """Queries per class of the test episodes ``method`` is scored on at ``shot``: 1 (compare's list), or, for a
    transductive head, its released test episodes' (``SPEC.test_queries(K)``), on which its accuracy depends."""
    if method in heads.REGISTRY:
        spec = heads.get(method)
        if spec.transductive and spec.test_queries is not None:
            return int(spec.test_queries(shot))
    return 1


def _spread(values: list[float]) -> dict[str, float]:
    """The spread of per-seed numbers: the sample standard deviation (n - 1), min and max."""
    v = np.asarray(values, dtype=np.float64)
    return {"std": float(v.std(ddof=1)), "min": float(v.min()), "max": float(v.max())}


def table_rows(cfg: Any, accs: dict[tuple[str, int], np.ndarray], dataset: str, model: str,
               tuned: dict[tuple[str, int], dict[str, Any]] | None = None,
               selected: dict[tuple[str, int], list[dict[int, float]]] | None = None) -> list[dict[str, Any]]:
    """One row per method: per shot its mean and CI, the spread over training seeds, the paired difference to the
    reference (per seed and overall), the reported number, for a tuned method its best trial's parameters and val
    accuracy, and with ``selected`` what its checkpoint best on test would claim.

    Args:
        accs: per (method, shot) the per-episode accuracies (%), ``(E,)`` or ``(S, E)``: one row per training seed
            (a method without parameters: one row whatever the seeds).
        selected: per (method, shot) and seed, each kept checkpoint's mean test accuracy (%) by its episodes.
    """
    from mdmf_cache.data.episodes import mean_ci
    from mdmf_cache.paper import backbone_of, reported

    def seeds_of(a) -> np.ndarray:
        return np.atleast_2d(np.asarray(a, dtype=np.float64))  # (S, E)

    def pick(a: np.ndarray, i: int) -> np.ndarray:
        return a[i if len(a) > 1 else 0]

    rows = []
    for method in cfg.methods:
        row: dict[str, Any] = {"method": method, "backbone": backbone_of(model) if model else "",
                               "transductive": transductive(method)}
        if method != cfg.reference:
            row["vs_ref_transductive_inductive"] = transductive(method) != transductive(cfg.reference)
        for shot in cfg.shots:
            acc = seeds_of(accs[method, shot])
            q = test_queries(method, shot)
            if q != 1:
                row[f"{shot}shot_test_queries"] = q
            row[f"{shot}shot"], row[f"{shot}shot_ci95"] = mean_ci(acc.mean(axis=0))
            if len(acc) > 1:
                for i, a in enumerate(acc):
                    row[f"{shot}shot_seed{i}"] = float(a.mean())
                row.update({f"{shot}shot_seed_{k}": v for k, v in _spread(acc.mean(axis=1).tolist()).items()})
            if method != cfg.reference:
                ref = seeds_of(accs[cfg.reference, shot])
                paired = q == test_queries(cfg.reference, shot)  # the same episodes; else a difference of means
                n = max(len(acc), len(ref))
                diffs = []
                for i in range(n):
                    a, r = pick(acc, i), pick(ref, i)
                    d = (mean_ci(a - r) if paired
                         else (float(a.mean() - r.mean()), float(np.hypot(mean_ci(a)[1], mean_ci(r)[1]))))
                    diffs.append(d)
                    if n > 1:
                        row[f"{shot}shot_diff_seed{i}"], row[f"{shot}shot_diff_seed{i}_ci95"] = float(d[0]), d[1]
                a, r = acc.mean(axis=0), ref.mean(axis=0)
                ci = mean_ci(a - r)[1] if paired else float(np.hypot(mean_ci(a)[1], mean_ci(r)[1]))
                row[f"{shot}shot_diff"], row[f"{shot}shot_diff_ci95"] = float(np.mean([d[0] for d in diffs])), ci
                row[f"{shot}shot_diff_paired"] = paired
                if n > 1:
                    row.update({f"{shot}shot_diff_seed_{k}": v for k, v in _spread([d[0] for d in diffs]).items()})
            paper = reported(method, dataset, shot, model)
            if paper is not None:
                row[f"{shot}shot_reported"], row[f"{shot}shot_reported_backbone"] = paper
            best = (tuned or {}).get((method, shot))
            if best is not None:
                row[f"{shot}shot_tuned"] = params_text(best["params"])
                row[f"{shot}shot_tuned_val"] = best["val_acc"]
            kept = (selected or {}).get((method, shot))
            if kept:
                top = [max(k.items(), key=lambda item: item[1]) for k in kept]  # per seed (episodes, test accuracy)
                gaps = [t - float(a.mean()) for (_, t), a in zip(top, acc)]
                row[f"{shot}shot_test_selected"] = float(np.mean([t for _, t in top]))
                row[f"{shot}shot_test_selected_gap"] = float(np.mean(gaps))
                row[f"{shot}shot_test_selected_at"] = ";".join(str(e) for e, _ in top)  # episodes, per seed
                if len(kept) > 1:
                    for i, ((_, t), g) in enumerate(zip(top, gaps)):
                        row[f"{shot}shot_test_selected_seed{i}"], row[f"{shot}shot_test_selected_gap_seed{i}"] = t, g
        rows.append(row)
    return rows


def params_text(params: dict[str, Any]) -> str:
    """``lr=0.000312, lambda=0.84``."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table_notes(cfg: Any, rows: list[dict[str, Any]]) -> list[str]:
    """The notes under the table that this comparison needs, beyond the reading of its columns: training seeds,
    transductive heads, heads scored on their own episode list, the test-selected column."""
    notes = []
    if cfg.seeds > 1:
        notes.append(
            f"Training seeds: each trained method was trained {cfg.seeds} times, with training seeds {cfg.seed} to "
            f"{cfg.seed + cfg.seeds - 1} (runs/METHOD_Kshot_seedI), every run on the same data and scored on the same "
            "episodes. Its accuracy is the mean over seeds ± the 95% CI over the episodes of the seed-averaged "
            "per-episode accuracy; 'seeds' gives the sample standard deviation over seeds of the per-seed means and "
            "their [min, max]. 'vs ref' is the mean of the per-seed paired differences (seed i against the "
            "reference's seed i; a method without parameters counts once for every seed) ± the episode CI of their "
            "average; 'per seed' lists them with their standard deviation. Heads without parameters and baselines "
            "have no training seed: one score, spread '-'.")
    if any(r["transductive"] for r in rows):
        notes.append("† transductive: uses the episode's other queries (a query's logits depend on the other "
                     "queries of its episode, which an inductive method never sees).")
        if any(r.get("vs_ref_transductive_inductive") for r in rows):
            notes.append("‡ a transductive method against an inductive one: the difference mixes the two settings.")
    own = sorted({(r["method"], k, r[f"{k}shot_test_queries"]) for r in rows for k in cfg.shots
                  if f"{k}shot_test_queries" in r})
    for method, shot, q in own:
        notes.append(f"{method} {shot}-shot: scored on its own list of {cfg.test_episodes} episodes with {q} queries "
                     f"per class ({list_name(cfg.way, shot, q)}), its released test setting (SPEC.test_queries), "
                     "not the shared list with 1; its difference to the reference is unpaired (a difference of means, "
                     "their CIs combined in quadrature).")
    if cfg.test_selected:
        notes.append(
            "Test-selected: every trained run kept the heads of each validation (runs/.../checkpoints), and each was "
            "scored on these test episodes. The column gives the accuracy of the checkpoint best ON TEST, what a "
            "codebase that keeps the checkpoint best on the test split would report, and in parentheses its gap "
            "to the val-selected best.pt above (test-selected minus val-selected; means over seeds). It is biased "
            "upwards by construction and is shown only to measure by how much that selection flatters a number.")
    return notes


def markdown_table(rows: list[dict[str, Any]], shots: tuple[int, ...], sweep: int = 0, seeds: int = 1,
                   test_selected: bool = False, notes: list[str] | tuple[str, ...] = ()) -> str:
    """What ``table.md`` holds (:func:`write_tables`)."""
    from mdmf_cache.report.tables import compare_layout

    head, body = compare_layout(rows, shots, digits=2, seeds=seeds, sweep=sweep, test_selected=test_selected)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = ("\nAccuracy in %, mean ± 95% CI over the same seeded test episodes; 'vs ref' is the paired difference "
            "to the reference method. 'reported' is what the CLIP-MDMF paper's Tables 1-2 give for that method and "
            "dataset, on the backbone in parentheses: ResNet-50 (ImageNet) numbers are not CLIP results.\n")
    if sweep:
        note += (f"\nTuned on val: each trained method was tuned per shot by a {sweep}-trial sweep on val "
                 "(sweeps/METHOD_Kshot); its best trial's run is what is scored here (with several seeds its seed 0; the "
                 "other seeds train its config again), and the column 'tuned on val' gives that trial's parameters.\n")
    note += "".join(f"\n{n}\n" for n in notes)
    return "\n".join(lines) + "\n" + note


def _tex(text: str) -> str:
    return "".join({"_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}"}.get(c, c)
                   for c in text)


def latex_table(rows: list[dict[str, Any]], shots: tuple[int, ...], digits: int = 1) -> str:
    """``table.tex``: a booktabs tabular of the accuracy (mean $\\pm$ 95% CI) per shot, the best mean of each shot
    in bold, then the difference to the reference per shot; a transductive method marked $^\\dagger$, a difference
    between a transductive and an inductive method $^\\ddagger$, an unpaired one (u). Needs ``\\usepackage{booktabs}``.
    The other columns (seed spread, reported numbers, tuned parameters, test-selected) are in table.md and table.csv."""
    f = f"{{:.{digits}f}}"
    best = {k: max((r[f"{k}shot"] for r in rows), default=None) for k in shots}
    lines = ["% mdmf-cache compare: accuracy in %, mean +- 95% CI over the same seeded test episodes; best mean per shot "
             "in bold; Delta: the paired difference to the reference method. Needs \\usepackage{booktabs}.",
             "% The other columns (seed spread, reported numbers, tuned parameters, test-selected accuracy) and the "
             "notes: table.md; every number: table.csv.",
             r"\begin{tabular}{l" + "r" * (2 * len(shots)) + "}", r"\toprule",
             " & ".join(["Method", *(f"{k}-shot" for k in shots), *(f"$\\Delta$ {k}-shot" for k in shots)]) + r" \\",
             r"\midrule"]
    for r in rows:
        cells = [_tex(r["method"]) + (r"$^\dagger$" if r.get("transductive") else "")]
        for k in shots:
            text = f"{f.format(r[f'{k}shot'])} $\\pm$ {f.format(r[f'{k}shot_ci95'])}"
            if r[f"{k}shot"] == best[k]:
                best[k] = None  # one bold per column: the first of a tie
                text = r"\textbf{" + text + "}"
            cells.append(text)
        mark = r"$^\ddagger$" if r.get("vs_ref_transductive_inductive") else ""
        for k in shots:
            if f"{k}shot_diff" not in r:
                cells.append("(ref)")
                continue
            unpaired = " (u)" if not r.get(f"{k}shot_diff_paired", True) else ""
            cells.append(f"${r[f'{k}shot_diff']:+.{digits}f} \\pm {f.format(r[f'{k}shot_diff_ci95'])}${unpaired}{mark}")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict[str, Any]], shots: tuple[int, ...], sweep: int = 0, seeds: int = 1,
                 test_selected: bool = False, notes: list[str] | tuple[str, ...] = ()) -> None:
    """``table.csv`` (every number), ``table.md`` (the paper's layout: one row per method, a column per shot;
    with several ``seeds`` the spread over seeds and the per-seed differences; after a ``sweep`` of that many
    trials, a column with each tuned method's best trial's parameters per shot; with ``test_selected`` the
    test-selected accuracy and its gap), then ``notes``; ``table.tex`` (:func:`latex_table`)."""
    from mdmf_cache.fileio import atomic_write_csv, atomic_write_text

    atomic_write_csv(out / "table.csv", rows)
    atomic_write_text(out / "table.md", markdown_table(rows, shots, sweep, seeds, test_selected, notes))
    atomic_write_text(out / "table.tex", latex_table(rows, shots))


def list_name(way: int, shot: int, queries: int) -> str:
    return f"episodes_{way}way_{shot}shot" + (f"_{queries}queries" if queries != 1 else "") + ".npz"
