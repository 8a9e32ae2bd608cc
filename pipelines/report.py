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
    for col in ("split", "videos", "done", "failed", "missing", "classes", "features (N,V,T,D)", "text"):
        table.add_column(col, justify="left" if col == "split" else "right")
    summary = {"path": str(path), "complete": store.is_complete(), "splits": {}, "fingerprint": store.fingerprint}
    for split in store.splits:
        s = store.split_summary(split)
        summary["splits"][split] = s
        table.add_row(split, str(s["videos"]), f"{s['done']}/{s['videos']}", str(s["failed"]), str(s["missing"]),
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
