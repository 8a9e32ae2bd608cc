"""Rich tables for the end of a pipeline and for ``mdmf-cache info``."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def print_extract_summary(path: Path, results) -> None:
    table = Table(title=f"extracted into {path}")
    for col in ("split", "videos", "this run", "failed", "short (<T)", "missing", "videos/s"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for r in results:
        rate = f"{(r.extracted + r.failed) / r.seconds:.1f}" if r.seconds > 0 else "-"
        table.add_row(r.split, str(r.videos), str(r.extracted), str(r.failed), str(r.short), str(r.missing), rate)
    console.print(table)
    failures = [f for r in results for f in r.failures]
    if failures:
        console.print(f"[yellow]{len(failures)} videos failed[/] (recorded in the cache), e.g.:")
        for vid, err in failures[:5]:
            console.print(f"  {vid}: {err}")


def print_info(path: Path) -> dict:
    """Print and return a cache's summary."""
    from mdmf_cache.store import CacheStore

    store = CacheStore(path)
    table = Table(title=str(path))
    for col in ("split", "videos", "done", "failed", "short (<T)", "missing", "classes", "features (N,V,T,D)", "text"):
        table.add_column(col, justify="left" if col == "split" else "right")
    summary = {"path": str(path), "complete": store.is_complete(), "splits": {}, "fingerprint": store.fingerprint}
    for split in store.splits:
        s = store.split_summary(split)
        summary["splits"][split] = s
        table.add_row(split, str(s["videos"]), f"{s['done']}/{s['videos']}", str(s["failed"]), str(s["short"]), str(s["missing"]),
                      str(s["classes"]), "x".join(map(str, s["shape"])), "yes" if s["has_text"] else "no")
    console.print(table)
    console.print("complete: " + ("[green]yes[/]" if summary["complete"] else "[yellow]no[/] (rerun the extract command to finish)"))
    for split, s in summary["splits"].items():
        for vid, err in s["failures"][:5]:
            console.print(f"  [yellow]failed[/] {split} {vid}: {err}")
        if len(s["failures"]) > 5:
            console.print(f"  ... and {len(s['failures']) - 5} more failures in {split}")
    console.print("fingerprint: " + json.dumps(store.fingerprint, indent=1))
    return summary


def print_eval(results: dict, per_class: bool = True) -> None:
    """Accuracy +- 95% CI per shot, then per-class accuracy of the last shot."""
    table = Table(title=f"{results['method']} on {results['split']} ({results['way']}-way, "
                        f"{results['queries_per_class']} query/class)")
    for col in ("shot", "accuracy %", "± 95% CI", "episodes"):
        table.add_column(col, justify="right")
    for shot, r in results["shots"].items():
        table.add_row(shot, f"{r['accuracy']:.2f}", f"{r['ci95']:.2f}", str(r["episodes"]))
    console.print(table)
    if per_class and results["shots"]:
        shot, r = list(results["shots"].items())[-1]
        pc = Table(title=f"per-class accuracy, {shot}-shot")
        pc.add_column("class")
        pc.add_column("accuracy %", justify="right")
        for name, acc in sorted(r.get("per_class", {}).items(), key=lambda kv: (kv[1] is None, kv[1])):
            pc.add_row(name, "-" if acc is None else f"{acc:.1f}")
        console.print(pc)
    if "out" in results:
        console.print(f"results: {results['out']}/results.json")


def print_comparison(rows: list[dict], title: str) -> None:
    """Methods side by side: accuracy +- CI, paired difference and the paper's numbers when known."""
    table = Table(title=title)
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "episodes"))
    for col in cols:
        table.add_column(col, justify="left" if col in ("arm", "method") else "right")
    for r in rows:
        table.add_row(*[f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    console.print(table)


def print_sweep(res: dict) -> None:
    """The best trials of a sweep and where its tables, best config and figures are."""
    rows = res["rows"]
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -r["value"])
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    table = Table(title=f"sweep {res['out']}: {states['COMPLETE']} complete, {states['PRUNED']} pruned, "
                        f"{states['FAIL']} failed" + (f", {states['RUNNING']} running" if states["RUNNING"] else ""))
    params = list(dict.fromkeys(k for r in done for k in r["params"]))
    for col in ("trial", "val %", *params, "episodes"):
        table.add_column(col, justify="right")
    for r in done[:10]:
        table.add_row(str(r["number"]), f"{r['value']:.2f}", *[_short(r["params"].get(k)) for k in params],
                      str(r["episodes"] or ""))
    console.print(table)
    out = res["out"]
    console.print(f"tables: {out}/trials.csv, {out}/trials.md")
    if res.get("best"):
        b = res["best"]
        console.print(f"best: trial {b['trial']}, val {b['val_acc']:.2f}%; "
                      f"retrain it with: mdmf-cache train --config {out}/best.json --out runs/NAME")
    if res.get("figures"):
        console.print("figures: " + ", ".join(str(p) for p in res["figures"]))


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)
