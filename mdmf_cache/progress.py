"""rich progress bars for long work (extraction, training, evaluation, sweeps); shown only when a caller asks."""

from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12.3 videos/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


def make_progress(unit: str, *extra: ProgressColumn) -> Progress:
    """Description, bar, done/total, rate, extra columns, elapsed and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    *extra, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


class FieldColumn(ProgressColumn):
    """A task field, e.g. ``FieldColumn("loss", "loss {:.3f}", "loss -")``; ``unset`` while the field is None (no value
    yet); blank for tasks without it (a sub-task on the bar)."""

    def __init__(self, name: str, fmt: str, unset: str = ""):
        super().__init__()
        self.name = name
        self.fmt = fmt
        self.unset = unset

    def render(self, task) -> Text:
        if self.name not in task.fields:
            return Text("")
        value = task.fields[self.name]
        return Text(self.unset if value is None else self.fmt.format(value))
