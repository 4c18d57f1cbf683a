"""The data step's privacy boundary: randomized response, drawn once and persisted.

For each (seed, epsilon) and stage partition, every pair's label passes RR
exactly once: with probability gamma_eps the two responses swap places. The
result -- ``{id, prompt, chosen, rejected}`` in the *privatized* orientation --
is written to the job's output directory in one atomic file, together with the
draw's metadata. A re-run or resume reads that file back and never redraws:
a second draw of the same labels would spend privacy again.

Nothing downstream of this module sees a raw label, except the non-private
baseline (which trains on them by definition) and the optional label-accuracy
diagnostic, which only compares in the driver and logs an aggregate.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from props_ray.privacy.randomized_response import flip_probability, randomized_response_flips

META_KEY = b"props_ray.randomized_response"


class PrivatizedLabelsError(RuntimeError):
    """Persisted privatized labels that do not match the job; never silently redrawn."""


@dataclass(frozen=True)
class PrivatizedPartition:
    pairs: pd.DataFrame  # id, prompt, chosen, rejected in the privatized orientation
    path: Path
    epsilon: float
    reused: bool


def ids_digest(ids) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


def privatized_path(job_dir: Path, seed: int, epsilon: float, stage: int, stages: int) -> Path:
    return (Path(job_dir) / "privatized" / f"seed={seed}" / f"stages={stages}" / f"epsilon={epsilon:g}"
            / f"partition-{stage}.parquet")


def _draw(partition: pd.DataFrame, epsilon: float, seed: int, stage: int, secure: bool) -> pd.DataFrame:
    rng = None if secure else np.random.default_rng([seed, stage, int(round(epsilon * 1e6)), 0x2252])
    flips = randomized_response_flips(len(partition), epsilon, rng=rng, secure=secure)
    out = partition[["id", "prompt"]].copy()
    out["chosen"] = np.where(flips, partition["rejected"], partition["chosen"])
    out["rejected"] = np.where(flips, partition["chosen"], partition["rejected"])
    return out


def _write_atomic(df: pd.DataFrame, path: Path, meta: dict) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_privatized(path: Path) -> tuple[pd.DataFrame, dict]:
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table.to_pandas(), meta


def privatize_partition(partition: pd.DataFrame, *, job_dir: Path, seed: int, epsilon: float, stage: int,
                        stages: int, secure: bool, draw: bool = True) -> PrivatizedPartition:
    """RR labels for one stage partition: read back if persisted, else drawn once and written.

    ``draw=False`` (trial tasks, which run after the driver drew every label) only reads: a
    missing file is an error, never a fresh draw.
    """
    path = privatized_path(job_dir, seed, epsilon, stage, stages)
    digest = ids_digest(partition["id"])
    if path.exists():
        df, meta = read_privatized(path)
        if meta.get("ids_sha256") != digest or meta.get("epsilon") != epsilon:
            raise PrivatizedLabelsError(
                f"{path} holds RR labels drawn for a different partition or epsilon "
                f"(epsilon {meta.get('epsilon')}, {meta.get('n')} pairs); refusing to redraw them, which would "
                f"spend privacy again. Use a new job name, or remove that directory deliberately.")
        return PrivatizedPartition(df, path, epsilon, reused=True)
    if not draw:
        raise PrivatizedLabelsError(f"{path} is missing: the RR labels of stage {stage} at epsilon {epsilon} were "
                                    f"not drawn before the trial started; refusing to draw them in a trial task")
    df = _draw(partition, epsilon, seed, stage, secure)
    meta = {"epsilon": epsilon, "flip_probability": flip_probability(epsilon), "seed": None if secure else seed,
            "secure": secure, "stage": stage, "n": len(df), "ids_sha256": digest}
    _write_atomic(df, path, meta)
    return PrivatizedPartition(df, path, epsilon, reused=False)
