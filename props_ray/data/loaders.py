"""Load preference pairs from local files or the Hugging Face hub.

:func:`load_preferences` is the entry point: it reads raw rows
(:func:`read_rows` for a local file, :func:`datasets.load_dataset` for a hub
id), turns them into pair records with the parser of their format
(:data:`PARSERS`, chosen by :func:`detect_format` when ``format="auto"``) and
validates them with :func:`props_ray.data.records.validate_pairs`.

Formats
-------
``hh_rlhf``
    Anthropic HH-RLHF: ``{"chosen": dialogue, "rejected": dialogue}``, each a
    whole ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` dialogue. The prompt is
    the chosen dialogue up to and including its last ``"\\n\\nAssistant:"``;
    the responses are the rest of each dialogue, **verbatim** (the leading
    space is kept, as in TRL), so ``prompt + chosen`` and ``prompt + rejected``
    are exactly the original dialogues. A row whose rejected dialogue does not
    start with that prompt is bad.
``preference``
    ``prompt``, ``chosen``, ``rejected`` columns (e.g. truthy-dpo); other
    columns (``system``, ...) are ignored.
``alpaca_eval``
    AlpacaEval annotations: ``instruction``, ``output_1``, ``output_2``,
    ``preference``. The preference is ``1``/``2`` (string or number) or a float
    in [1, 2]: above 1.5 prefers ``output_2``, below prefers ``output_1``; 1.5
    is a tie, skipped and counted (never an error); a missing preference is a bad row (no label).

Every parser keeps one output row per input row (bad rows are flagged in
:data:`~props_ray.data.records.PROBLEM_COLUMN`, not dropped), so row numbers
in messages are positions in the source. Ids are the row's ``id`` column when
the data has one, else ``"<source name>:<row>"`` where the source name is the
file name or the hub id.
"""

from __future__ import annotations

import gzip
import json
import numbers
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from props_ray.data.records import (PAIR_COLUMNS, PROBLEM_COLUMN, TIE_PROBLEM, DataError, check_on_bad_row,
                                    is_missing, text_problem, validate_pairs)

ASSISTANT_TAG = "\n\nAssistant:"

class _RowProblem(Exception):
    """A row that a parser cannot turn into a pair; the message starts with the field name."""


# --------------------------------------------------------------------------- parsers

def _as_frame(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    return rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))


def _require_columns(df: pd.DataFrame, needed: Iterable[str], fmt: str, source_name: str) -> None:
    absent = [c for c in needed if c not in df.columns]
    if absent:
        raise DataError(f"{source_name}: format {fmt!r} needs column {absent[0]!r} "
                        f"(columns found: {sorted(map(str, df.columns))})")


def _parse_rows(rows: list[dict[str, Any]] | pd.DataFrame, source_name: str, fmt: str,
                needed: tuple[str, ...],
                to_pair: Callable[[dict[str, Any]], tuple[Any, Any, Any]]) -> pd.DataFrame:
    """Apply ``to_pair`` (raw row -> prompt, chosen, rejected) to every row; flag failures."""
    df = _as_frame(rows)
    _require_columns(df, needed, fmt, source_name)
    has_id = "id" in df.columns
    out = []
    for row, record in enumerate(df.to_dict("records")):
        row_id = record["id"] if has_id else f"{source_name}:{row}"
        try:
            prompt, chosen, rejected = to_pair(record)
            out.append((row_id, prompt, chosen, rejected, None))
        except _RowProblem as problem:
            out.append((row_id, None, None, None, str(problem)))
    return pd.DataFrame(out, columns=[*PAIR_COLUMNS, PROBLEM_COLUMN], dtype=object)


def _text(record: dict[str, Any], name: str) -> str:
    problem = text_problem(record.get(name), name)
    if problem:
        raise _RowProblem(problem)
    return record[name]


def _split_hh_dialogues(record: dict[str, Any]) -> tuple[str, str, str]:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    cut = chosen.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise _RowProblem(f"field 'chosen' has no {ASSISTANT_TAG!r} turn")
    prompt = chosen[:cut + len(ASSISTANT_TAG)]
    if not rejected.startswith(prompt):
        raise _RowProblem("field 'rejected' does not start with the prompt of 'chosen' "
                          f"(the chosen dialogue up to its last {ASSISTANT_TAG!r})")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def parse_hh_rlhf(rows: list[dict[str, Any]] | pd.DataFrame, source_name: str) -> pd.DataFrame:
    """HH-RLHF dialogues -> pairs; responses are kept verbatim (see the module docstring)."""
    return _parse_rows(rows, source_name, "hh_rlhf", ("chosen", "rejected"), _split_hh_dialogues)


def parse_preference(rows: list[dict[str, Any]] | pd.DataFrame, source_name: str) -> pd.DataFrame:
    """``prompt``/``chosen``/``rejected`` rows -> pairs (values are checked by validation)."""
    return _parse_rows(rows, source_name, "preference", ("prompt", "chosen", "rejected"),
                       lambda r: (r["prompt"], r["chosen"], r["rejected"]))


def preferred_output(value: Any) -> int:
    """1 or 2: which AlpacaEval output ``value`` prefers; raises ``_RowProblem`` if none."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise _RowProblem("field 'preference' is missing (no label)")
        try:
            number = float(text)
        except ValueError:
            raise _RowProblem(f"field 'preference' is {value!r}, not a number in [1, 2]") from None
    elif is_missing(value):
        raise _RowProblem("field 'preference' is missing (no label)")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise _RowProblem(f"field 'preference' is not a number (got {type(value).__name__})")
    if number != number:  # NaN, e.g. from the string "nan"
        raise _RowProblem("field 'preference' is missing (no label)")
    if not 1.0 <= number <= 2.0:
        raise _RowProblem(f"field 'preference' is {number}, outside [1, 2]")
    if number == 1.5:
        raise _RowProblem(f"field 'preference' is 1.5, {TIE_PROBLEM}")
    return 2 if number > 1.5 else 1


def _alpaca_pair(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    first, second = record["output_1"], record["output_2"]
    if preferred_output(record["preference"]) == 1:
        return record["instruction"], first, second
    return record["instruction"], second, first


def parse_alpaca_eval(rows: list[dict[str, Any]] | pd.DataFrame, source_name: str) -> pd.DataFrame:
    """AlpacaEval annotations -> pairs; ``chosen`` is the output the preference points to."""
    return _parse_rows(rows, source_name, "alpaca_eval",
                       ("instruction", "output_1", "output_2", "preference"), _alpaca_pair)


#: Format name -> parser ``(rows, source_name) -> DataFrame``.
PARSERS: dict[str, Callable[[Any, str], pd.DataFrame]] = {
    "hh_rlhf": parse_hh_rlhf,
    "preference": parse_preference,
    "alpaca_eval": parse_alpaca_eval,
}

_FORMAT_COLUMNS = {
    "alpaca_eval": ("instruction", "output_1", "output_2", "preference"),
    "preference": ("prompt", "chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),  # and no prompt column
}


def detect_format(columns: Iterable[str]) -> str:
    """The format whose columns ``columns`` has (see the module docstring)."""
    found = set(map(str, columns))
    if set(_FORMAT_COLUMNS["alpaca_eval"]) <= found:
        return "alpaca_eval"
    if set(_FORMAT_COLUMNS["preference"]) <= found:
        return "preference"
    if {"chosen", "rejected"} <= found:
        return "hh_rlhf"
    expected = "; ".join(f"{name}: {list(cols)}" for name, cols in _FORMAT_COLUMNS.items())
    expected += " without 'prompt'"
    raise DataError(f"cannot detect the data format from columns {sorted(found)}; "
                    f"expected one of: {expected}")


# --------------------------------------------------------------------------- local files

_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in _SUFFIXES if name.endswith(s)), None)


def _json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {line_no}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(value).__name__}")
        rows.append(value)
    return rows


def _json_list(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    for index, value in enumerate(values):
        if not isinstance(value, dict):
            raise DataError(f"{path}: item {index} of the JSON list is not an object "
                            f"(got {type(value).__name__})")
    return values


def read_rows(path: str | Path) -> pd.DataFrame:
    """Raw rows of a local ``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz`` or ``.parquet`` file.

    ``.json`` files may hold a JSON list of objects or JSON lines; ``.jsonl``
    files hold JSON lines (blank lines are ignored). Raises :class:`DataError`
    naming the file for an unknown extension or a file that cannot be read or
    parsed (with the line number for malformed JSON).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix is None:
        raise DataError(f"{path}: unknown file type; expected one of {', '.join(_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, ValueError) as exc:
        # pyarrow's ArrowInvalid is a ValueError; bad gzip is OSError/EOFError/zlib.error
        raise DataError(f"{path}: cannot read file ({type(exc).__name__}: {exc})") from None
    if suffix.startswith(".json") and not suffix.startswith(".jsonl") and text.lstrip().startswith("["):
        rows = _json_list(text, path)
    else:
        rows = _json_lines(text, path)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- hub

def read_hub_rows(dataset_id: str, split: str) -> pd.DataFrame:
    """Raw rows of split ``split`` of the hub data set ``dataset_id``, as a DataFrame."""
    try:
        from datasets import load_dataset  # heavy import, only needed for hub ids

        return load_dataset(dataset_id, split=split).to_pandas()
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        raise DataError(f"{dataset_id!r} is not a local file and could not be loaded from the "
                        f"Hugging Face hub (split {split!r}): {type(exc).__name__}: {exc}. "
                        "Pass the path of a local .jsonl/.json/.parquet file instead, "
                        "or check the id and your network / HF_HUB_OFFLINE setting.") from exc


def _looks_like_path(source: str) -> bool:
    return (_suffix(Path(source)) is not None
            or source.startswith(("/", "./", "../", "~"))
            or "\\" in source)


# --------------------------------------------------------------------------- entry point

@dataclass
class LoadedPreferences:
    """Validated pairs of one source, plus the rows that were skipped."""

    pairs: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)
    source: str = ""
    format: str = ""


def load_preferences(source: str, format: str = "auto", split: str = "train",
                     limit: int | None = None, on_bad_row: str = "error") -> LoadedPreferences:
    """Load and validate the preference pairs of ``source``.

    ``source`` is a local file (see :func:`read_rows`) when such a file
    exists, otherwise a Hugging Face hub data set id, loaded with
    ``datasets.load_dataset(source, split=split)`` (``split`` is ignored for
    local files). A string that looks like a file path (a known extension, or
    starting with ``/``, ``./``, ``../``, ``~``) but names no file is reported
    as a missing file rather than tried on the hub.

    ``format`` is ``"auto"`` (:func:`detect_format`) or a key of
    :data:`PARSERS`. ``on_bad_row`` is ``"error"`` or ``"skip"`` (see
    :func:`~props_ray.data.records.validate_pairs`).

    ``limit`` is applied **after** validation: every row of the source is
    checked (and, with ``"skip"``, reported in ``skipped``), then the first
    ``limit`` valid pairs are kept.

    Raises :class:`DataError` when the source cannot be read, its format is
    unknown, a row is bad (with ``"error"``), or no valid pair remains.
    """
    check_on_bad_row(on_bad_row)
    if format != "auto" and format not in PARSERS:
        raise ValueError(f"format must be 'auto' or one of {sorted(PARSERS)}, got {format!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")

    path = Path(source).expanduser()
    if path.is_file():
        raw, source_name = read_rows(path), path.name
    elif path.exists():
        raise DataError(f"{source}: is a directory, not a data file")
    elif _looks_like_path(source):
        raise DataError(f"{source}: no such file")
    else:
        raw, source_name = read_hub_rows(source, split), source
    if raw.empty:
        raise DataError(f"{source}: contains no rows")

    if format == "auto":
        try:
            format = detect_format(raw.columns)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
    parsed = PARSERS[format](raw, source_name)
    pairs, skipped = validate_pairs(parsed, source, on_bad_row)
    if pairs.empty:
        raise DataError(f"{source}: no valid pairs ({len(skipped)} bad row(s) skipped; "
                        f"first: row {skipped[0]['row']}: {skipped[0]['reason']})")
    if limit is not None:
        pairs = pairs.head(limit).reset_index(drop=True)
    return LoadedPreferences(pairs=pairs, skipped=skipped, source=source, format=format)
