"""Progress bars and messages, all on stderr so that stdout stays clean for piping."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
Item = TypeVar("Item")


def track(items: Iterable[Item], total: int, description: str) -> Iterator[Item]:
    """Iterate with a progress bar (drawn only on a terminal; silent in logs and CI)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        yield from progress.track(items, total=total, description=description)


def note(message: str) -> None:
    console.print(Text.assemble(("note: ", "cyan"), message), soft_wrap=True)


def warn(message: str) -> None:
    console.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)


class LiveBar:
    """A progress bar with live figures (loss, images/s) for long loops; silent off a terminal.

    Off a terminal (CI, logs) it prints one plain line every `log_every` updates instead, so a
    long job still shows it is alive.
    """

    def __init__(self, description: str, total: int, start: int = 0, log_every: int = 100,
                 enabled: bool = True) -> None:
        self.description, self.total, self.done = description, total, start
        self.log_every, self.enabled = log_every, enabled
        self._text = ""
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[figures]}"), TimeRemainingColumn())
        self._progress = Progress(*columns, console=console, transient=False,
                                  disable=not (enabled and console.is_terminal))
        self._task = self._progress.add_task(description, total=total, completed=start,
                                             figures="")

    def __enter__(self) -> LiveBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, advance: int = 1, **figures: float | str) -> None:
        """Advance; new figures replace the shown ones, which otherwise stay until the next."""
        self.done += advance
        if figures:
            self._text = "  ".join(f"{key} {value:.4g}" if isinstance(value, float)
                                   else f"{key} {value}" for key, value in figures.items())
        text = self._text
        self._progress.update(self._task, advance=advance, figures=text)
        if advance and self.enabled and not console.is_terminal and (
                self.done % self.log_every == 0 or self.done == self.total):
            console.print(f"{self.description} {self.done}/{self.total}  {text}", soft_wrap=True)
