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
