"""Splitting a preference file in two, once and reproducibly: a split kept apart (for SFT, a judge or
public text) and the private preference data. A pair goes to the first part when a seeded hash of its
id falls under ``fraction``, so the same file, fraction and seed always give the same parts, and a pair
never lands in both."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from props_ray.errors import UserError


def split_pairs(pairs: pd.DataFrame, fraction: float, seed: int, salt: str = "split") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rest, the ``fraction`` part), each in the input's order. Splits with different ``salt`` are
    independent: the judge's held-out pairs are not all from one side of an earlier split."""
    u = np.array([int.from_bytes(hashlib.sha256(f"{salt}:{seed}:{i}".encode()).digest()[:8], "big") / 2 ** 64
                  for i in pairs["id"]])
    part = u < fraction
    return pairs[~part].reset_index(drop=True), pairs[part].reset_index(drop=True)


def refuse_private_source(source: str, private_source: str, command: str, why: str) -> None:
    """A kept-apart split must not be the job's own preference data (``data.source``): ``why`` says what
    training ``command`` on it would leak."""
    if source == private_source or Path(source).resolve() == Path(private_source).resolve():
        raise UserError(f"{command}: {source} is the job's own preference data (data.source); {why}")


def write_pairs(pairs: pd.DataFrame, path: str | Path) -> None:
    """JSON lines in the ``preference`` format ({id, prompt, chosen, rejected}), which every loader reads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in pairs[["id", "prompt", "chosen", "rejected"]].to_dict("records"):
            f.write(json.dumps(r) + "\n")
