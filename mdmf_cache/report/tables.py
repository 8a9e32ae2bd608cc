"""Rich tables for the end of a pipeline and for ``mdmf-cache info``."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mdmf_cache.errors import CacheError

console = Console()


def print_extract_summary(path: Path, results) -> None:
    """What this run did per split: videos on disk, reused rows, extracted now, failures, missing."""
    table = Table(title=f"extracted into {path}")
    for col in ("split", "videos", "reused", "this run", "failed", "short", "missing", "videos/s"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for r in results:
        rate = f"{(r.extracted + r.failed) / r.seconds:.1f}" if r.seconds > 0 else "-"
        table.add_row(r.split, str(r.videos), str(r.reused), str(r.extracted), str(r.failed), str(r.short),
                      str(r.missing), rate)
    console.print(table)
    for r in results:
        if r.added:
            console.print(f"{r.split}: {r.added} videos new since the last run, added")
        if r.vanished:
            console.print(f"[yellow]{r.split}: {len(r.vanished)} extracted videos are no longer on disk[/] "
                          f"(rows kept, unused until they are back), e.g. {', '.join(r.vanished[:3])}")
        if r.changed:
            console.print(f"{r.split}: {r.changed} videos changed on disk since they were extracted (size or mtime): "
                          "extracted again")
        if r.retried:
            console.print(f"{r.split}: retried {r.retried} videos that had failed: {r.retried - r.still_failing} "
                          f"decode now, {r.still_failing} still failing")
        if r.kept_failed:
            console.print(f"{r.split}: {r.kept_failed} videos that failed before were not decoded again (their files "
                          "did not change; --retry-failed decodes them again)")
        if r.damage:
            redo = f"{r.repaired} rows extracted again" if r.repaired else "no row needed extracting again"
            console.print(f"[yellow]{r.split}: repaired {len(r.damage)} damaged parts[/] (e.g. {r.damage[0]}): {redo}",
                          soft_wrap=True)
        if r.text and r.text != "new":
            console.print(f"{r.split}: {r.text}: text embeddings recomputed, frame features unchanged")
        if r.tokens:
            console.print(f"{r.split}: tokens {r.token_spec} added to {r.tokens} finished videos (features unchanged)")
    failures = [f for r in results for f in r.failures]
    if failures:
        console.print(f"[yellow]{len(failures)} videos failed[/] (recorded in the cache), e.g.:")
        for vid, err in failures[:5]:
            console.print(f"  {vid}: {err}")


INFO_ROWS = (  # (label, summary key or formatter): one line per field, one column per split
    ("videos on disk", lambda s: str(s["videos"])),
    ("done", lambda s: f"{s['done']}/{s['videos']}"),
    ("failed", lambda s: str(s["failed"])),
    ("short (<T)", lambda s: str(s["short"])),
    ("missing", lambda s: str(s["missing"])),
    ("kept, not on disk", lambda s: str(s["kept"])),
    ("classes", lambda s: str(s["classes"])),
    ("features N,V,T,D", lambda s: ",".join(map(str, s["shape"]))),
    ("text", lambda s: "yes" if s["has_text"] else "no"),
    ("tokens", lambda s: f"{s['tokens']['done']}/{s['tokens']['of']}" if s["tokens"] else "-"),
)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def token_arrays_info(store) -> list[dict]:
    """Each token array of a cache: split, name, layer, grid, class token, Dt, P, shape and bytes on disk."""
    import os

    from mdmf_cache.tokens import array_name

    out = []
    for split in store.splits:
        info = store.tokens_info(split)
        if info is None:
            continue
        for layer in info.layers:
            name = array_name(layer)
            folder = store.path / split / name
            with os.scandir(folder) as it:
                size = sum(e.stat().st_size for e in it if e.is_file())
            out.append({"split": split, "array": name, "layer": layer, "grid": list(info.grid), "cls": info.cls,
                        "dim": info.dim, "patches": info.patches, "shape": list(store.root[split][name].shape),
                        "bytes": size})
    return out


def print_info(path: Path) -> dict:
    """Print and return a cache's summary: fields down, splits across, so it reads in 80 columns."""
    from mdmf_cache.store.cache import CacheStore
    from mdmf_cache.store.verify import damage_message

    store = CacheStore(path)
    damages = store.verify(deep=False)
    if any(d.fix in ("meta", "split") for d in damages):  # the arrays cannot be summarised
        raise CacheError(damage_message(path, damages))
    summary = {"path": str(path), "complete": store.is_complete() and not damages, "splits": {},
               "fingerprint": store.fingerprint, "damaged": [str(d) for d in damages]}
    for split in store.splits:
        summary["splits"][split] = store.split_summary(split)
    summary["token_arrays"] = token_arrays_info(store)
    console.print(f"cache: {path}", soft_wrap=True)
    table = Table()
    table.add_column("")
    for split in summary["splits"]:
        table.add_column(split, justify="right")
    for label, fmt in INFO_ROWS:
        table.add_row(label, *[fmt(s) for s in summary["splits"].values()])
    console.print(table)
    if summary["token_arrays"]:  # what each token array holds (the tokens row above: finished rows that have them)
        tokens = Table(title="token arrays (N, V, T, P, Dt) float16")
        for col in ("split", "array", "layer", "grid", "class token", "P", "Dt", "on disk"):
            tokens.add_column(col, justify="left" if col in ("split", "array") else "right")
        for a in summary["token_arrays"]:
            tokens.add_row(a["split"], a["array"], a["layer"], "x".join(map(str, a["grid"])), "yes" if a["cls"] else "no",
                           str(a["patches"]), str(a["dim"]), _size(a["bytes"]))
        console.print(tokens)
    if damages:
        console.print(f"complete: [red]no, damaged[/] ({len(damages)} parts; 'mdmf-cache verify {path}' reads every "
                      "chunk; rerun the extract command to repair):", soft_wrap=True)
        for d in damages[:5]:
            console.print(f"  [red]damaged[/] {d}", soft_wrap=True)
    else:
        console.print("complete: " + ("[green]yes[/]" if summary["complete"] else "[yellow]no[/] (rerun the extract command to finish)"))
    lacking = {split: s["tokens"]["of"] - s["tokens"]["done"] for split, s in summary["splits"].items()
               if s["tokens"] and s["tokens"]["done"] < s["tokens"]["of"]}
    if lacking:
        console.print("[yellow]tokens not complete[/]: " + "; ".join(f"{split}: {k} finished videos without their tokens"
                                                                      for split, k in lacking.items())
                      + " (rerun the extract command)")
    for split, s in summary["splits"].items():
        for vid, err in s["failures"][:5]:
            console.print(f"  [yellow]failed[/] {split} {vid}: {err}")
        if len(s["failures"]) > 5:
            console.print(f"  ... and {len(s['failures']) - 5} more failures in {split}")
    console.print("fingerprint: " + json.dumps(store.fingerprint, indent=1))
    return summary


def print_verify(path: Path) -> list:
    """Read every chunk of a cache; print each damaged part, or what was checked. Raises CacheError if damaged."""
    import time

    from mdmf_cache.store.cache import CacheStore

    t0 = time.perf_counter()
    store = CacheStore(path)
    damages = store.verify(deep=True)
    seconds = time.perf_counter() - t0
    if damages:
        console.print(f"[red]{path} is damaged[/] ({len(damages)} parts):", soft_wrap=True)
        for d in damages:
            console.print(f"  {d}", soft_wrap=True)
        fixes = {"rows": "those rows are extracted again", "chunk": "the unreadable chunk file is removed and its rows redone",
                 "labels": "labels are written again from the split files", "text": "the prompt embeddings are recomputed",
                 "sync": "presence and order are written again", "meta": "the zarr.json is written again (chunks kept)",
                 "split": "the split is rebuilt (extracted again)"}
        for fix in dict.fromkeys(d.fix for d in damages):
            console.print(f"  repair ({fix}): {fixes[fix]}")
        raise CacheError(f"{len(damages)} damaged parts in {path}; rerun the extract command that made it to "
                         "repair them (only damaged rows are extracted again)")
    rows = {s: store.num_rows(s) for s in store.splits}
    pending = {s: int((~store.done_mask(s) & store.present_mask(s)).sum()) for s in store.splits}
    console.print(f"{path}: no damage ({', '.join(f'{s} {n} rows' for s, n in rows.items())}; every chunk read "
                  f"in {seconds:.1f} s)", soft_wrap=True)
    no_text = [s for s in store.splits if store.prompts(s) is None]
    if any(pending.values()) or no_text:
        todo = [f"{s}: {k} videos not extracted yet" for s, k in pending.items() if k]
        todo += [f"{s}: no text embeddings yet" for s in no_text]
        console.print(f"[yellow]not complete[/]: {'; '.join(todo)}; rerun the extract command to finish")
    return damages


def print_eval(results: dict, per_class: bool = True) -> None:
    """Accuracy +- 95% CI per shot, then per-class accuracy of the last shot. A transductive head is marked in the title
    (its accuracy depends on the queries per class, which the title gives, per shot when they differ)."""
    queries = results["queries_per_class"]  # {shot: queries per class}
    per_class_q = "/".join(str(q) for q in dict.fromkeys(queries.values())) if len(set(queries.values())) == 1 \
        else ", ".join(f"{q} at K={k}" for k, q in queries.items())
    mark = " (transductive)" if results.get("transductive") else ""
    table = Table(title=f"{results['method']}{mark} on {results['split']} ({results['way']}-way, "
                        f"{per_class_q} query/class)")
    trained = results.get("trained_shot")
    for col in ("shot", "accuracy %", "± 95% CI", "episodes", *(("note",) if trained else ())):
        table.add_column(col, justify="right")
    for shot, r in results["shots"].items():
        # the paper trains one model per shot: a shot other than the run's own is marked
        note = (f"trained at K={trained}",) if trained and int(shot) != trained else (("",) if trained else ())
        table.add_row(shot, f"{r['accuracy']:.2f}", f"{r['ci95']:.2f}", str(r["episodes"]), *note)
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


def print_heads(name: str | None = None) -> None:
    """The registered heads (name, parameters or not, per-video evaluation, summary), or one head's options."""
    import dataclasses

    from mdmf_cache import heads

    if name is None:
        table = Table(title="registered heads (--method)")
        for col in ("method", "trainable", "per-video eval", "transductive", "presets", "what it is"):
            table.add_column(col, no_wrap=col not in ("presets", "what it is"))
        for entry in heads.REGISTRY.values():
            spec = heads.get(entry.name)
            table.add_row(entry.name, "yes" if spec.parametric else "no", "yes" if spec.per_video else "no",
                          "yes" if spec.transductive else "no", ", ".join(spec.presets), spec.summary)
        console.print(table)
        return
    spec = heads.get(name)
    table = Table(title=f"{name}: options (--head-opt KEY=VALUE); {spec.source}")
    for col in ("option", "default", *(f"preset {p}" for p in spec.presets)):
        table.add_column(col)
    for f in dataclasses.fields(spec.options):
        if f.name not in spec.option_names:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(data)"
        table.add_row(f.name, "released per dataset/shot" if default is None else repr(default),
                      *(repr(spec.presets[p][f.name]) if f.name in spec.presets[p] else "" for p in spec.presets))
    console.print(table)
    console.print(f"training episodes for a K-shot run: {spec.train_shot(1)}-shot at K=1, {spec.train_shot(5)}-shot at "
                  f"K=5, {spec.train_queries(5)} queries per class")
    if spec.transductive:
        released = (f"eval scores it with its released test queries per class ({spec.test_queries(1)} at K=1, "
                    f"{spec.test_queries(5)} at K=5) unless --queries-per-class is given"
                    if spec.test_queries is not None else "eval scores it with --queries-per-class (default 1)")
        console.print(f"transductive: a query's logits depend on the other queries of its episode; {released}; "
                      "predict scores it one query per episode", soft_wrap=True)
    else:
        console.print("not transductive: a query's logits do not depend on the other queries of its episode")


def compare_layout(rows: list[dict], shots, digits: int = 2, seeds: int = 1, sweep: int = 0,
                   test_selected: bool = False) -> tuple[list[str], list[list[str]]]:
    """``compare``'s table as text cells: the header and one list of cells per row (``table.md`` and the printed
    table). A transductive method's name ends in †, a difference between a transductive and an inductive method in
    ‡, an unpaired difference (another episode list) says so; a spread a method without seeds lacks is "-"."""
    f = f"{{:.{digits}f}}"
    head = ["method", *(f"{k}-shot" for k in shots)]
    head += [f"{k}-shot seeds: sd [min, max]" for k in shots] if seeds > 1 else []
    head += [f"{k}-shot vs ref" for k in shots]
    head += [f"{k}-shot vs ref per seed" for k in shots] if seeds > 1 else []
    head += ["reported (backbone)"]
    head += ["tuned on val (best trial)"] if sweep else []
    head += [f"{k}-shot test-selected (gap)" for k in shots] if test_selected else []
    body = []
    for r in rows:
        cells = [r["method"] + (" †" if r.get("transductive") else "")]
        cells += [f"{f.format(r[f'{k}shot'])} ± {f.format(r[f'{k}shot_ci95'])}" for k in shots]
        if seeds > 1:
            cells += [f"{f.format(r[f'{k}shot_seed_std'])} [{f.format(r[f'{k}shot_seed_min'])}, "
                      f"{f.format(r[f'{k}shot_seed_max'])}]" if f"{k}shot_seed_std" in r else "-" for k in shots]
        mark = " ‡" if r.get("vs_ref_transductive_inductive") else ""
        diffs = []
        for k in shots:
            if f"{k}shot_diff" not in r:
                diffs.append("(ref)")
                continue
            unpaired = "" if r.get(f"{k}shot_diff_paired", True) else " unpaired"
            diffs.append(f"{r[f'{k}shot_diff']:+.{digits}f} ± {f.format(r[f'{k}shot_diff_ci95'])}{unpaired}{mark}")
        cells += diffs
        if seeds > 1:
            for k in shots:
                if f"{k}shot_diff" not in r:
                    cells.append("(ref)")
                elif f"{k}shot_diff_seed_std" in r:
                    per = ", ".join(f"{r[f'{k}shot_diff_seed{i}']:+.{digits}f}" for i in range(seeds))
                    cells.append(f"{per} (sd {f.format(r[f'{k}shot_diff_seed_std'])})")
                else:
                    cells.append("-")
        rep = [f"{r[f'{k}shot_reported']:.1f}" if f"{k}shot_reported" in r else "-" for k in shots]
        backbones = sorted({r[f"{k}shot_reported_backbone"] for k in shots if f"{k}shot_reported_backbone" in r})
        cells.append(f"{'/'.join(rep)} ({', '.join(backbones)})" if backbones else "-")
        if sweep:
            cells.append("; ".join(f"{k}-shot: {r[f'{k}shot_tuned']}" for k in shots if f"{k}shot_tuned" in r) or "-")
        if test_selected:
            cells += [f"{f.format(r[f'{k}shot_test_selected'])} ({r[f'{k}shot_test_selected_gap']:+.{digits}f})"
                      if f"{k}shot_test_selected" in r else "-" for k in shots]
        body.append(cells)
    return head, body


def print_compare(rows: list[dict], shots, title: str, seeds: int = 1, sweep: int = 0,
                  test_selected: bool = False) -> None:
    """``compare``'s table (:func:`compare_layout`, one decimal): per method and shot the accuracy, the spread over
    seeds, the paired difference to the reference, the reported one, the test-selected accuracy."""
    from rich.markup import escape

    head, body = compare_layout(rows, shots, digits=1, seeds=seeds, sweep=sweep, test_selected=test_selected)
    table = Table(title=escape(title))
    for i, name in enumerate(head):  # "[min, max]" is text, not markup
        table.add_column(escape(name), justify="left" if i == 0 or name.startswith(("reported", "tuned")) else "right")
    for cells in body:
        table.add_row(*map(escape, cells))
    console.print(table)


def print_predictions(res: dict, show: int = 10) -> None:
    """``predict``'s outcome: the first ``show`` queries with their class and its probability, then how many
    queries each class got (with its supports), then where the CSV is."""
    rows = res["rows"]
    table = Table(title=f"predictions ({len(rows)} queries; first {min(show, len(rows))})")
    table.add_column("query", overflow="fold")
    table.add_column("predicted", overflow="fold")
    table.add_column("probability", justify="right")
    for r in rows[:show]:
        table.add_row(r["query"], r["predicted"] or "[yellow]not decodable[/]",
                      f"{r['probability']:.3f}" if r["predicted"] else "-")
    console.print(table)
    counts = Table(title=f"per class (K={res['shot']} supports per pass, {res['passes']} pass"
                         f"{'es' if res['passes'] > 1 else ''})")
    for col in ("class", "supports", "predicted"):
        counts.add_column(col, justify="left" if col == "class" else "right")
    for c in res["classes"]:
        counts.add_row(c, str(res["supports"][c]), str(res["counts"][c]))
    console.print(counts)
    if res["failed"]:
        console.print(f"[yellow]{len(res['failed'])} queries could not be decoded[/] (empty rows), e.g. {res['failed'][0]}")
    console.print(f"predictions: {res['csv']}")


def print_runs(entries: list, root: str) -> None:
    """``runs``' table: one row per run, evaluation, comparison, ablation or sweep found (``listing.Entry``), its path
    relative to ``root``."""
    import os

    from rich.markup import escape

    table = Table(title=escape(f"{len(entries)} found under {root}"))
    for col in ("kind", "path", "cache", "method", "shot", "when", "best", "status"):
        table.add_column(col, overflow="fold", justify="right" if col == "shot" else "left")
    for e in entries:
        cache = (f"{escape(e.cache)} [yellow](moved)[/]" if e.cache_moved else escape(e.cache)) or "-"
        status = "[green]complete[/]" if e.complete else f"[yellow]{escape(e.status)}[/]"
        path = os.path.relpath(e.path, root) if Path(e.path).is_relative_to(root) else e.path
        table.add_row(e.kind, escape(path), cache, escape(e.method), e.shot, e.when.replace("T", " "),
                      escape(e.best) or "-", status)
    console.print(table)
