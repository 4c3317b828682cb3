"""The attacker's reference scores, kept in a run's state so that a resumed run does not train its
shadow federations again.

A reference model (``fedclip.attacks.reference_models``) is dropped once scored: what an attack
keeps of it is each target's log-probability. Those arrays are written (atomically) with a key of
the recipe that trained them (count, sites, rounds, steps, DP and training settings, seed) and the
base model's scores of the same targets. A resumed run reads them back only if the key and the base
scores match; otherwise it trains again and says why. Nothing here touches a site's data or a
privacy figure: the references are the attacker's, on the public population.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class ReferenceScored(Protocol):
    def reference_state(self) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def restore_references(self, out: Sequence[np.ndarray]) -> None: ...


def recipe_key(**recipe: Any) -> str:
    """A stable digest of what trained the references (values by their ``repr`` if not JSON)."""
    text = json.dumps(recipe, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def save(path: Path, views: Mapping[str, Sequence[ReferenceScored]], *, key: str) -> None:
    arrays: dict[str, np.ndarray] = {"key": np.array(key)}
    for view, attacks in views.items():
        for i, attack in enumerate(attacks):
            base, out = attack.reference_state()
            arrays[f"{view}/{i}/base"] = base
            arrays[f"{view}/{i}/out"] = np.stack(out) if out else np.empty((0, *base.shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def restore(path: Path, views: Mapping[str, Sequence[ReferenceScored]], *, key: str) -> str:
    """Give every attack its saved reference scores; returns "" if it did, else why not (nothing
    is changed then)."""
    if not path.is_file():
        return "none saved"
    try:
        with np.load(path) as saved:
            if str(saved["key"]) != key:
                return "trained with another recipe (rounds, steps, noise, count or seed changed)"
            restored = []
            for view, attacks in views.items():
                for i, attack in enumerate(attacks):
                    base, _ = attack.reference_state()
                    name = f"{view}/{i}"
                    if f"{name}/base" not in saved or not np.allclose(
                        saved[f"{name}/base"], base, rtol=1e-5, atol=1e-6
                    ):
                        return f"{name}: the targets or the base model changed"
                    restored.append((attack, list(saved[f"{name}/out"])))
            if len(saved.files) != 1 + 2 * len(restored):
                return "another set of attacks"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    for attack, out in restored:
        attack.restore_references(out)
    return ""
