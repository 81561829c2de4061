"""How numbers and names read in the terminal: the tables of `bitdelta info`, `eval` and `demo`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from rich.table import Column


def percent(share: float) -> str:
    """`share` as a percentage with one decimal; a share that rounds to zero reads 0.0%, never -0.0%
    (the base's own gain, 0 / negative, is -0.0)."""
    shown = f"{share:.1%}"
    return "0.0%" if shown == "-0.0%" else shown


def count(number: int, noun: str, plural: str | None = None) -> str:
    """'1 step', '2 steps', '0 steps'; `plural` where adding an s is wrong ('passes')."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def shared_prefix(names: Iterable[str]) -> str:
    """The first dotted component that more than half of `names` start with ('model.'), or ''.
    Stated once above a table, it leaves the names' distinguishing tails the width they need."""
    names = list(names)
    firsts = Counter(name.split(".", 1)[0] + "." for name in names if "." in name)
    if not firsts:
        return ""
    prefix, number = firsts.most_common(1)[0]
    return prefix if number * 2 > len(names) else ""


def name_column(header: str, names: Iterable[str]) -> Column:
    """A column of short names (models, not tensors) kept whole on one line; the other columns fold."""
    return Column(header, no_wrap=True, min_width=max(map(len, names), default=len(header)))


def column(header: str, justify: str = "left", cells: Iterable[str] = ()) -> Column:
    """A table column whose text folds onto more lines when the terminal is narrow, never cut with
    '…': rich narrows the widest columns first, so short names stay whole while long ones fold.
    With `cells`, it is never narrower than the longest of them (a header longer than that folds)."""
    return Column(header, justify=justify, overflow="fold", min_width=max(map(len, cells), default=None))


def size(nbytes: int) -> str:
    """Bytes to three significant digits in the largest decimal unit that fits: '260 B', '1.03 kB', '13.5 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= 0.9995 * scale:  # 999.6 MB reads 1 GB, not 1e+03 MB
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"
