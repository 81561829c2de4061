"""Where a benchmark's results go: the JSON beside the markdown table, which is also printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(folder: Path, name: str, result: dict, table: str) -> None:
    """folder/name.json (the result) and folder/name.md (its table), the table printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
    (folder / f"{name}.md").write_text(table)
    print(table)
