"""A batch command's TOML file (``fedclip compare``, ``fedclip tune``): its tables, checked by name."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_tables(path: str | Path, *, what: str, tables: Mapping[str, set[str] | None]) -> dict[str, dict[str, Any]]:
    """Every table of ``tables`` (absent ones empty); an unknown table, or a key outside a table's
    known set (``None``: the keys are checked by whoever reads the table), is refused by name."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TOML {what}: {exc}") from exc
    unknown = set(data) - set(tables)
    if unknown:
        names = ", ".join(f"[{t}]" for t in tables)
        raise ValueError(f"{path}: unknown table(s) {sorted(unknown)}; expected {names}")
    out = {}
    for name, known in tables.items():
        table = dict(data.get(name, {}))
        bad = set(table) - known if known is not None else set()
        if bad:
            raise ValueError(f"{path}: unknown key(s) {sorted(bad)} in [{name}]; expected {sorted(known)}")
        out[name] = table
    return out
