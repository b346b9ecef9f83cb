"""What the user sees while a run goes: a spinner or bar per stage, then one summary line."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class StageLine:
    def __init__(self) -> None:
        self.summary = ""

    def done(self, summary: str) -> None:
        self.summary = summary


@contextlib.contextmanager
def stage(console: Console, number: int, name: str, spinner: bool = True) -> Iterator[StageLine]:
    """Show a spinner while the stage runs, then `N. Name  summary  (seconds)`.

    Stages that show a progress bar of their own pass spinner=False (one live display at a time).
    """
    line = StageLine()
    started = time.perf_counter()
    with console.status(f"[bold]{number}. {name}[/]…") if spinner else contextlib.nullcontext():
        yield line
    console.print(f"[green]✓[/] [bold]{number}. {name}[/]  {line.summary}  [dim]({time.perf_counter() - started:.1f} s)[/]")


def progress_bar(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
