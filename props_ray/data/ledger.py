"""The privacy ledger: each preference label is randomized once per dataset, whatever the job.

A ledger belongs to a *dataset*, found by a fingerprint of its content, and lives in
``OUTPUT_DIR/ledger/<fingerprint>/``, so every job on the same data and output directory shares
it, whatever its name, K, seed or epsilon list::

    ledger.json           the ledger: its keys, every draw (epsilon, file, SHA-256), the cumulative
                          label-epsilon spent on the dataset, and the jobs that used it
    draw-1.parquet        draw 1: for every pair id, which response its RR label prefers
    ../LEDGERS.jsonl      one line per ledger ever created under OUTPUT_DIR (so a deleted one is noticed)

Rules:

- **One draw, at the largest epsilon asked for.** A job's label-DP trials (``rr``, ``props``) at
  epsilons e_1 < ... < e_m are served by one draw at e_m; each smaller e is derived by flipping the
  e_m label again with gamma' (:func:`~props_ray.privacy.randomized_response.derived_flip_probability`),
  a keyed pseudo-random function of the pair id: post-processing, so the list costs e_m, not the sum.
- **Never a silent redraw.** A draw whose file is missing, truncated or altered, or a job that asks
  for a larger epsilon than the draw holds, is refused with a :class:`LedgerError` that says what
  was lost and what a new draw would cost. A new draw is an explicit opt-in,
  ``privacy.accept_new_draw: N`` (the number of the draw it accepts, so re-running the same job does
  not draw again), and adds its epsilon to the cumulative label-epsilon.
- **Written before use.** A draw's file is written atomically (temporary file, fsync, rename) with
  its entry in the file's own metadata, then the ledger; a draw whose ledger write was interrupted
  is adopted (and counted) on the next open, never discarded.
- **Nothing about the raw labels.** The fingerprint hashes each pair's two responses as an unordered
  pair, so it is the same for either label; the draw file holds privatized labels only. The keys
  (stage assignment, derivation) are secret in secure runs, drawn from the OS CSPRNG, and no seed is
  written; seeded runs derive them from the seed and are marked not private.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from props_ray.data.files import sha256_of, write_atomic
from props_ray.data.records import orient
from props_ray.errors import UserError
from props_ray.privacy.randomized_response import derived_flip_probability, flip_probability, \
    randomized_response_flips
from props_ray.privacy.randomness import keyed_uniform, new_key, seeded_key

LEDGER_FILE = "ledger.json"
INDEX_FILE = "LEDGERS.jsonl"
META_KEY = b"props_ray.ledger_draw"
VERSION = 1


class LedgerError(UserError):
    """The ledger refuses: a lost or altered draw, or a use that would spend privacy again."""


def dataset_fingerprint(pairs: pd.DataFrame) -> str:
    """SHA-256 of the dataset's content, the same whichever response each label prefers.

    Per pair, sorted by id: the id, the prompt and the two responses as an unordered pair.
    """
    h = hashlib.sha256(b"props-ray dataset v1\n")
    rows = sorted(zip(pairs["id"].astype(str), pairs["prompt"], pairs["chosen"], pairs["rejected"]))
    for i, p, a, b in rows:
        h.update(json.dumps([i, p, *sorted((a, b))], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _first_response(chosen: pd.Series, rejected: pd.Series) -> np.ndarray:
    """True where ``chosen`` is the lexicographically first of the two responses (label-free order)."""
    return (chosen.to_numpy(dtype=object) < rejected.to_numpy(dtype=object)).astype(bool)


@dataclass(frozen=True)
class Draw:
    number: int
    epsilon: float
    file: str
    sha256: str
    n: int
    secure: bool


class Ledger:
    """The ledger of one dataset under one output directory (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, fingerprint: str, state: dict, exists: bool):
        self.base = Path(output_dir) / "ledger"
        self.fingerprint = fingerprint
        self.root = self.base / fingerprint[:32]
        self.state = state
        self.exists = exists
        self._labels: pd.DataFrame | None = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, output_dir: str | os.PathLike, pairs: pd.DataFrame, *, source: str, secure: bool,
             seed: int) -> "Ledger":
        """The dataset's ledger, checked; or a new one (not yet written) with fresh keys.

        Refuses (:class:`LedgerError`) a ledger whose file is gone or unreadable while the index
        knows it, and a ledger made with another ``secure`` setting than this job's.
        """
        fingerprint = dataset_fingerprint(pairs)
        base = Path(output_dir) / "ledger"
        path = base / fingerprint[:32] / LEDGER_FILE
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise LedgerError(f"{path} cannot be read ({err}): it records every RR draw of this dataset. "
                                  f"Restore it from a backup; drawing again would spend privacy again.") from None
            if state.get("fingerprint") != fingerprint:
                raise LedgerError(f"{path} belongs to another dataset (fingerprint {state.get('fingerprint')!r}); "
                                  f"it was altered or moved. Restore it from a backup.")
            ledger = cls(output_dir, fingerprint, state, exists=True)
            ledger._adopt_orphans()
        else:
            known = [r for r in _read_index(base) if r.get("fingerprint") == fingerprint]
            if known:
                raise LedgerError(
                    f"the ledger of this dataset ({source}) was created under {base} on {known[0].get('created')} "
                    f"but {path} is gone: its RR draws and the privacy they spent are lost. Restore "
                    f"{path.parent} from a backup; a new draw would spend privacy again.")
            ledger = cls(output_dir, fingerprint, _new_state(fingerprint, source, len(pairs), secure, seed), False)
        if ledger.secure != secure:
            made, now = ("secure", "seeded") if ledger.secure else ("seeded", "secure")
            raise LedgerError(
                f"the ledger {ledger.root} of this dataset was made with {made} randomness "
                f"(privacy.secure_randomness: {str(ledger.secure).lower()}) and this job asks for {now} "
                f"randomness. Its keys and draws cannot change kind: "
                + ("seeded labels can be replayed from the seed, so they cannot be reused as private. "
                   if not ledger.secure else "")
                + f"Set privacy.secure_randomness: {str(ledger.secure).lower()}, or use another output_dir.")
        if source not in ledger.state["sources"]:
            ledger.state["sources"].append(source)
        return ledger

    # -- what it holds ------------------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return bool(self.state["secure"])

    @property
    def ledger_id(self) -> str:
        """A random id for MLflow: unlike the fingerprint, it says nothing about the data."""
        return self.state["ledger_id"]

    @property
    def partition_key(self) -> str:
        return self.state["keys"]["partition"]

    @property
    def draws(self) -> list[Draw]:
        return [Draw(**{k: d[k] for k in Draw.__dataclass_fields__}) for d in self.state["draws"]]

    @property
    def current(self) -> Draw | None:
        draws = self.draws
        return draws[-1] if draws else None

    @property
    def cumulative_epsilon(self) -> float:
        """Label-epsilon spent on this dataset: the sum over every draw ever made (sequential composition)."""
        return float(sum(d.epsilon for d in self.draws))

    def describe(self) -> str:
        d = self.current
        if d is None:
            return f"ledger {self.root}: no RR draw yet"
        return (f"ledger {self.root}: draw {d.number} at epsilon {d.epsilon:g} for {d.n} pairs; "
                f"cumulative label-epsilon spent on this dataset {self.cumulative_epsilon:g} "
                f"over {len(self.draws)} draw(s)")

    # -- checks and draws ---------------------------------------------------------------------
    def plan(self, epsilon_max: float | None, accept_new_draw: int | None) -> str:
        """What :meth:`ensure_draw` would do, without doing it: 'none', 'reuse' or 'draw'.

        Raises :class:`LedgerError` where it would refuse.
        """
        if epsilon_max is None:
            return "none"
        d = self.current
        problem = None
        if d is not None:
            problem = self._file_problem(d)
            if problem is None and d.epsilon >= epsilon_max:
                return "reuse"
            if problem is None and accept_new_draw is not None and accept_new_draw <= d.number:
                raise LedgerError(
                    f"privacy.accept_new_draw = {accept_new_draw} accepts a draw the ledger already has, but draw "
                    f"{d.number} holds epsilon {d.epsilon:g} and this job asks for {epsilon_max:g}. "
                    + self._new_draw_advice(max(epsilon_max, d.epsilon)))
        nxt = 1 if d is None else d.number + 1
        if d is None and accept_new_draw in (None, 1):
            return "draw"
        if accept_new_draw == nxt:
            return "draw"
        if accept_new_draw is not None and accept_new_draw != nxt:
            raise LedgerError(f"privacy.accept_new_draw = {accept_new_draw}, but the ledger {self.root} has "
                              f"{0 if d is None else d.number} draw(s): the next one would be draw {nxt}")
        if problem is not None:
            raise LedgerError(
                f"{problem}. It holds the RR labels of {d.n} pairs drawn at epsilon {d.epsilon:g}, which trials "
                f"may already have trained on; a new draw of the same raw labels would spend privacy again. "
                f"Restore the file from a backup, or " + self._new_draw_advice(max(epsilon_max, d.epsilon)))
        raise LedgerError(
            f"this job asks for RR labels at epsilon {epsilon_max:g}, but the ledger {self.root} holds draw "
            f"{d.number} at epsilon {d.epsilon:g}: smaller epsilons are derived from it, a larger one needs a "
            f"new draw of the same raw labels. Lower privacy.epsilons to at most {d.epsilon:g}, or "
            + self._new_draw_advice(epsilon_max))

    def _new_draw_advice(self, epsilon: float) -> str:
        nxt = len(self.draws) + 1
        return (f"draw again deliberately with --set privacy.accept_new_draw={nxt}: draw {nxt} at epsilon "
                f"{epsilon:g} would make the cumulative label-epsilon of this dataset "
                f"{self.cumulative_epsilon:g} + {epsilon:g} = {self.cumulative_epsilon + epsilon:g}")

    def ensure_draw(self, pairs: pd.DataFrame, epsilon_max: float | None, *, accept_new_draw: int | None,
                    seed: int, job: str) -> Draw | None:
        """Make sure a draw at ``epsilon_max`` or more exists (drawing it if :meth:`plan` says so) and write
        the ledger. ``pairs`` is the whole dataset (the fingerprinted one). Driver only."""
        with self._lock():
            self._reload()
            action = self.plan(epsilon_max, accept_new_draw)
            if action == "draw":
                eps = max(epsilon_max, self.current.epsilon) if self.current else epsilon_max
                self._draw(pairs, eps, seed, job)
            self.state["uses"].append({"job": job, "epsilon_max": epsilon_max, "draw": getattr(self.current, "number", None),
                                       "time": _now()})
            self._save()
        return self.current

    def save(self) -> None:
        """Write the ledger (its keys) even when no draw is needed: stages depend on its partition key."""
        with self._lock():
            self._reload()
            self._save()

    def _draw(self, pairs: pd.DataFrame, epsilon: float, seed: int, job: str) -> None:
        number = len(self.draws) + 1
        ordered = pairs.sort_values("id", kind="stable").reset_index(drop=True)
        rng = None if self.secure else np.random.default_rng([int(seed), number, 0x2252])
        flips = randomized_response_flips(len(ordered), epsilon, rng=rng, secure=self.secure)
        first = _first_response(ordered["chosen"], ordered["rejected"])
        table = pd.DataFrame({"id": ordered["id"].astype(str), "prefers_first": first ^ flips})
        entry = {"number": number, "epsilon": float(epsilon), "flip_probability": flip_probability(epsilon),
                 "file": f"draw-{number}.parquet", "n": int(len(table)), "secure": self.secure,
                 "created": _now(), "job": job}
        if not self.secure:
            entry["seed"] = int(seed)  # seeded: reproducible and not private; secure runs write no seed
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        arrow = arrow.replace_schema_metadata({META_KEY: json.dumps({**entry, "fingerprint": self.fingerprint}).encode()})
        buf = io.BytesIO()
        pq.write_table(arrow, buf)
        path = self.root / entry["file"]
        write_atomic(path, buf.getvalue())  # written before anything can use it ...
        entry["sha256"] = sha256_of(path)
        self.state["draws"].append(entry)  # ... and recorded (the caller saves the ledger next)
        self._labels = None

    def _file_problem(self, d: Draw) -> str | None:
        path = self.root / d.file
        if not path.exists():
            return f"the ledger's draw {d.number} file {path} is missing"
        if sha256_of(path) != d.sha256:
            return f"the ledger's draw {d.number} file {path} was altered or truncated (its SHA-256 differs)"
        return None

    def _adopt_orphans(self) -> None:
        """A draw file written just before an interrupted ledger write is counted, never discarded."""
        while True:
            nxt = len(self.state["draws"]) + 1
            path = self.root / f"draw-{nxt}.parquet"
            if not path.exists():
                return
            try:
                meta = json.loads(pq.read_schema(path).metadata[META_KEY])
            except Exception:  # noqa: BLE001 - unreadable: the refusal below names the file
                raise LedgerError(f"{path} is a draw file the ledger {self.root / LEDGER_FILE} does not record "
                                  f"and cannot be read: restore the ledger from a backup") from None
            if meta.get("fingerprint") != self.fingerprint or meta.get("number") != nxt:
                raise LedgerError(f"{path} does not belong to the ledger {self.root / LEDGER_FILE}")
            meta.pop("fingerprint")
            meta["sha256"] = sha256_of(path)
            meta["adopted"] = _now()
            self.state["draws"].append(meta)
            self._save()

    # -- labels -------------------------------------------------------------------------------
    def labels(self, pairs: pd.DataFrame, epsilon: float) -> pd.DataFrame:
        """``pairs`` ({id, prompt, chosen, rejected}, raw orientation) in their epsilon-RR orientation.

        The current draw's label, flipped again with gamma' = derived_flip_probability(epsilon, draw
        epsilon) by a keyed function of the id: a function of the draw's labels alone.
        """
        d = self.current
        if d is None or d.epsilon < epsilon:
            raise LedgerError(f"the ledger {self.root} has no draw at epsilon {epsilon:g} or more "
                              f"(draws: {[(x.number, x.epsilon) for x in self.draws]}); labels are drawn only "
                              f"in the job's driver, before any trial starts")
        table = self._draw_table(d)
        ids = pairs["id"].astype(str)
        prefers_first = table.reindex(ids)
        if prefers_first.isna().any():
            missing = ids[prefers_first.isna().to_numpy()].iloc[0]
            raise LedgerError(f"pair id {missing!r} is not in the ledger's draw {d.number} ({self.root / d.file})")
        prefers_first = prefers_first.to_numpy(dtype=bool)
        if epsilon < d.epsilon:
            u = keyed_uniform(self.state["keys"]["derive"], ids, "derive", d.number, repr(float(epsilon)))
            prefers_first = prefers_first ^ (u < derived_flip_probability(epsilon, d.epsilon))
        first = _first_response(pairs["chosen"], pairs["rejected"])
        # keep the raw orientation where the privatized label prefers the raw chosen response
        return orient(pairs, prefers_first == first).reset_index(drop=True)

    def _draw_table(self, d: Draw) -> pd.Series:
        if self._labels is None or self._labels.attrs.get("number") != d.number:
            problem = self._file_problem(d)
            if problem:
                raise LedgerError(problem + "; restore it from a backup (a new draw would spend privacy again)")
            df = pd.read_parquet(self.root / d.file)
            self._labels = df.set_index("id")["prefers_first"]
            self._labels.attrs["number"] = d.number
        return self._labels

    # -- persistence --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _reload(self) -> None:
        """Re-read the ledger under the lock (another job may have written it since :meth:`open`)."""
        path = self.root / LEDGER_FILE
        if path.exists():
            on_disk = json.loads(path.read_text())
            if on_disk["keys"] != self.state["keys"]:  # two jobs created this ledger at once
                raise LedgerError(f"another job created the ledger {self.root} while this one was preparing "
                                  f"its partitions with other keys; run this job again (nothing was drawn)")
            sources = on_disk["sources"] + [s for s in self.state["sources"] if s not in on_disk["sources"]]
            self.state = {**on_disk, "sources": sources}
            self._adopt_orphans()

    def _save(self) -> None:
        first = not (self.root / LEDGER_FILE).exists()
        write_atomic(self.root / LEDGER_FILE, (json.dumps(self.state, indent=1) + "\n").encode())
        if first:
            with open(self.base / INDEX_FILE, "a") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint, "ledger_id": self.ledger_id,
                                    "created": self.state["created"]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.exists = True


def _new_state(fingerprint: str, source: str, n: int, secure: bool, seed: int) -> dict:
    keys = ({"partition": new_key(), "derive": new_key()} if secure else
            {"partition": seeded_key(seed, "partition"), "derive": seeded_key(seed, "derive")})
    state = {"version": VERSION, "ledger_id": uuid.uuid4().hex, "fingerprint": fingerprint, "sources": [source],
             "pairs": int(n), "secure": bool(secure), "created": _now(), "keys": keys, "draws": [], "uses": []}
    if not secure:
        state["seed"] = int(seed)
    return state


def _read_index(base: Path) -> list[dict]:
    path = base / INDEX_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
