"""The canonical preference-pair record and its validation.

Every loader in :mod:`props_ray.data.loaders` produces a table of pairs with
exactly the columns :data:`PAIR_COLUMNS`:

``id``
    a non-empty string, unique within the data set;
``prompt``
    a string, which may be empty (some data sets have no prompt);
``chosen``
    the response that the raw (human / judge) label prefers: a non-empty,
    not-whitespace-only string;
``rejected``
    the other response: a non-empty string that differs from ``chosen``.

:func:`validate_pairs` enforces this. A bad row either stops loading with a
:class:`DataError` (``on_bad_row="error"``) or is dropped and reported
(``on_bad_row="skip"``). Rows are numbered by their 0-based position in the
source, so "row 17" is the 18th record of the file (for JSON lines without
blank lines: line 18).

Format parsers may add the column :data:`PROBLEM_COLUMN` to flag rows they
could not parse (say, an AlpacaEval tie); :func:`validate_pairs` reports those
rows like any other bad row, so a data set's bad rows are all reported in one
place and in source order.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from props_ray.errors import UserError

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")

#: Optional column set by format parsers: ``None`` for a parsed row, else the
#: problem (starting with the field name, e.g. ``"field 'preference' is missing"``).
PROBLEM_COLUMN = "_parse_problem"
#: A parser's problem for a row whose label is a tie: no preference, so no pair. Always skipped and
#: counted (``skipped`` entries with ``"tie": True``), whatever ``on_bad_row`` says: it is not malformed.
TIE_PROBLEM = "a tie (no preference, so no label)"

ON_BAD_ROW = ("error", "skip")


class DataError(UserError, ValueError):
    """Preference data that cannot be used.

    The message names the source (file or hub id) and, for a bad row, the row
    position, the row id when it has one, and the field, e.g.
    ``"data/x.jsonl: row 17 (id 'abc'): field 'chosen' is empty"``.
    """


def orient(pairs: pd.DataFrame, keep) -> pd.DataFrame:
    """``{id, prompt, chosen, rejected}`` of ``pairs`` with the two responses swapped where ``keep`` is False:
    how a label (randomized, derived or combined) is applied to a pair."""
    import numpy as np

    out = pairs[["id", "prompt"]].copy()
    out["chosen"] = np.where(keep, pairs["chosen"], pairs["rejected"])
    out["rejected"] = np.where(keep, pairs["rejected"], pairs["chosen"])
    return out


def check_on_bad_row(on_bad_row: str) -> None:
    """Raise ``ValueError`` unless ``on_bad_row`` is ``"error"`` or ``"skip"``."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def is_missing(value: Any) -> bool:
    """True for ``None``, ``pandas.NA``/``NaT`` and float NaN (what pandas uses for absent values)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def text_problem(value: Any, field: str, allow_empty: bool = False) -> str | None:
    """Why ``value`` is not a usable text ``field``, or ``None`` if it is.

    Missing values and non-strings are always problems; an empty or
    whitespace-only string is one unless ``allow_empty``.
    """
    if is_missing(value):
        return f"field {field!r} is missing"
    if not isinstance(value, str):
        return f"field {field!r} is not a string (got {type(value).__name__})"
    if not allow_empty and not value.strip():
        return f"field {field!r} is empty"
    return None


def normalize_id(value: Any) -> tuple[str | None, str | None]:
    """Return ``(id_as_str, None)`` or ``(None, problem)``.

    Strings and integers are accepted; a float that holds an integer (pandas
    turns an integer column with gaps into floats) is written without ``.0``.
    """
    if is_missing(value):
        return None, "field 'id' is missing"
    if isinstance(value, bool):
        return None, "field 'id' is not a string or integer (got bool)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar
        value = value.item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
    if not isinstance(value, (str, int)):
        return None, f"field 'id' is not a string or integer (got {type(value).__name__})"
    text = str(value)
    if not text.strip():
        return None, "field 'id' is empty"
    return text, None


def _row_problem(row: int, row_id: str | None, problem: str) -> str:
    where = f"row {row}" if row_id is None else f"row {row} (id {row_id!r})"
    return f"{where}: {problem}"


def row_message(source: str, row: int, row_id: str | None, problem: str) -> str:
    """``"<source>: row <n> (id '<id>'): <problem>"``; the id part is left out when there is none."""
    return f"{source}: {_row_problem(row, row_id, problem)}"


def validate_pairs(df: pd.DataFrame, source: str,
                   on_bad_row: str = "error") -> tuple[pd.DataFrame, list[dict]]:
    """Check every row of ``df`` against the pair record; return ``(pairs, skipped)``.

    A row is bad when the parser flagged it (:data:`PROBLEM_COLUMN`), its
    ``id`` is missing/empty/not a string or integer, ``prompt`` is missing or
    not a string (an empty prompt is fine), ``chosen`` or ``rejected`` is
    missing, not a string, or empty/whitespace-only, ``chosen`` equals
    ``rejected``, or its ``id`` repeats the id of an earlier kept row (the
    first occurrence is kept).

    A tie (a parser's :data:`TIE_PROBLEM`) is skipped and reported in both modes, marked ``"tie": True``.
    ``on_bad_row="error"`` raises :class:`DataError` for the first bad row;
    ``"skip"`` drops bad rows and returns one ``{"id", "row", "reason"}`` dict
    per dropped row (``id`` is ``None`` when the row has no usable id; ``row``
    is the 0-based position in ``df``). A column missing from ``df``
    altogether raises :class:`DataError` in both modes.

    The returned frame has exactly :data:`PAIR_COLUMNS`, ``id`` as ``str``
    and a fresh ``RangeIndex``.
    """
    check_on_bad_row(on_bad_row)
    absent = [c for c in PAIR_COLUMNS if c not in df.columns]
    if absent:
        raise DataError(f"{source}: column {absent[0]!r} is missing "
                        f"(columns found: {sorted(map(str, df.columns))}; "
                        f"expected: {list(PAIR_COLUMNS)})")

    problems = df[PROBLEM_COLUMN].tolist() if PROBLEM_COLUMN in df.columns else [None] * len(df)
    kept: list[tuple[str, str, str, str]] = []
    skipped: list[dict] = []
    first_row_of_id: dict[str, int] = {}

    columns = [df[c].tolist() for c in PAIR_COLUMNS]
    for row, (raw_id, prompt, chosen, rejected) in enumerate(zip(*columns)):
        row_id, problem = normalize_id(raw_id)
        problem = (problems[row] if not is_missing(problems[row]) else None) or problem
        problem = (problem
                   or text_problem(prompt, "prompt", allow_empty=True)
                   or text_problem(chosen, "chosen")
                   or text_problem(rejected, "rejected"))
        if problem is None and chosen == rejected:
            problem = "fields 'chosen' and 'rejected' are identical"
        if problem is None and row_id in first_row_of_id:
            problem = f"field 'id' repeats the id of row {first_row_of_id[row_id]}"

        if problem is None:
            first_row_of_id[row_id] = row
            kept.append((row_id, prompt, chosen, rejected))
        elif problem.endswith(TIE_PROBLEM):
            skipped.append({"id": row_id, "row": row, "reason": problem, "tie": True})
        elif on_bad_row == "error":
            raise DataError(row_message(source, row, row_id, problem))
        else:
            skipped.append({"id": row_id, "row": row, "reason": problem})

    bad = [s for s in skipped if not s.get("tie")]
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d; first: %s", source, len(bad), len(df),
                    _row_problem(bad[0]["row"], bad[0]["id"], bad[0]["reason"]))
    pairs = pd.DataFrame(kept, columns=list(PAIR_COLUMNS), dtype=object)
    return pairs, skipped
