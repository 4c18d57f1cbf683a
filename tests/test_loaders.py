"""Tests for props_ray.data.loaders and props_ray.data.records (no Ray)."""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from props_ray.data.loaders import (LoadedPreferences, detect_format, load_preferences,
                                    parse_alpaca_eval, parse_hh_rlhf, parse_preference, read_rows)
from props_ray.data.records import PAIR_COLUMNS, DataError, validate_pairs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ALPACA_FILE = SHARED_DATA / "alpaca_eval" / "Mistral-7B-Instruct-v0.2.annotations.json"

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real preference data not found at {SHARED_DATA}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh_row(prompt_turns: str, chosen: str, rejected: str) -> dict:
    return {"chosen": prompt_turns + chosen, "rejected": prompt_turns + rejected}


PREF_ROWS = [
    {"id": "a", "system": "be truthful", "prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"id": "b", "system": "be truthful", "prompt": "Capital of France?", "chosen": "Paris",
     "rejected": "Lyon"},
]


# --------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def hh_raw() -> list[dict]:
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def hh() -> LoadedPreferences:
    return load_preferences(str(HH_FILE), on_bad_row="skip")


@needs_shared_data
class TestRealData:
    # Observed in harmless-base-test.jsonl.gz (2,312 rows): 4 chosen dialogues end in an empty
    # assistant turn ("\n\nAssistant: "), and in 4 the chosen response itself contains a further
    # "\n\nAssistant:" turn, so the rejected dialogue does not start with the chosen prompt.
    HH_EMPTY_CHOSEN = [86, 516, 925, 1103]
    HH_PROMPT_MISMATCH = [1254, 1688, 1952, 2036]

    def test_hh_counts_and_skipped_rows(self, hh_raw, hh):
        assert len(hh_raw) == 2312
        assert hh.format == "hh_rlhf"
        assert len(hh.pairs) == 2304
        assert len(hh.skipped) == 8
        assert list(hh.pairs.columns) == list(PAIR_COLUMNS)
        skipped = {s["row"]: s for s in hh.skipped}
        assert sorted(skipped) == sorted(self.HH_EMPTY_CHOSEN + self.HH_PROMPT_MISMATCH)
        for row in self.HH_EMPTY_CHOSEN:
            assert skipped[row]["reason"] == "field 'chosen' is empty"
            assert skipped[row]["id"] == f"harmless-base-test.jsonl.gz:{row}"
        for row in self.HH_PROMPT_MISMATCH:
            assert "field 'rejected'" in skipped[row]["reason"]
            assert "prompt" in skipped[row]["reason"]

    def test_hh_error_mode_stops_at_first_bad_row(self):
        with pytest.raises(DataError) as info:
            load_preferences(str(HH_FILE))
        message = str(info.value)
        assert message.startswith(f"{HH_FILE}: row 86 (id 'harmless-base-test.jsonl.gz:86')")
        assert "field 'chosen' is empty" in message

    def test_hh_prompts_and_reconstruction(self, hh_raw, hh):
        assert hh.pairs["prompt"].str.endswith("\n\nAssistant:").all()
        assert hh.pairs["id"].is_unique
        for pair in hh.pairs.itertuples(index=False):
            raw = hh_raw[int(pair.id.rsplit(":", 1)[1])]
            # responses are verbatim (leading space kept): exact reconstruction
            assert pair.prompt + pair.chosen == raw["chosen"]
            assert pair.prompt + pair.rejected == raw["rejected"]
            assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
            assert "\n\nAssistant:" not in pair.chosen

    def test_alpaca_eval_counts_and_labels(self):
        raw = json.loads(ALPACA_FILE.read_text(encoding="utf-8"))
        loaded = load_preferences(str(ALPACA_FILE))
        assert loaded.format == "alpaca_eval"
        assert len(raw) == 805
        assert len(loaded.pairs) == 805 and loaded.skipped == []
        by_id = loaded.pairs.set_index("id")
        name = ALPACA_FILE.name

        # a few hand-picked rows of each label, checked against the raw JSON
        # (the README says "1"/"2"; this file stores the ints 1 and 2)
        assert {type(r["preference"]) for r in raw} == {int}
        prefer_1 = [i for i, r in enumerate(raw) if r["preference"] == 1][:3]
        prefer_2 = [i for i, r in enumerate(raw) if r["preference"] == 2][:3]
        assert len(prefer_1) == 3 and len(prefer_2) == 3
        for i in prefer_1:
            pair = by_id.loc[f"{name}:{i}"]
            assert (pair.prompt, pair.chosen, pair.rejected) == (
                raw[i]["instruction"], raw[i]["output_1"], raw[i]["output_2"])
        for i in prefer_2:
            pair = by_id.loc[f"{name}:{i}"]
            assert (pair.prompt, pair.chosen, pair.rejected) == (
                raw[i]["instruction"], raw[i]["output_2"], raw[i]["output_1"])

        # and every row
        n_prefer_2 = 0
        for i, r in enumerate(raw):
            pair = by_id.loc[f"{name}:{i}"]
            preferred = r["output_2"] if r["preference"] == 2 else r["output_1"]
            n_prefer_2 += r["preference"] == 2
            assert pair.chosen == preferred
        assert n_prefer_2 == 125


# --------------------------------------------------------------------------- formats

class TestDetectFormat:
    @pytest.mark.parametrize("columns, expected", [
        (["chosen", "rejected"], "hh_rlhf"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["system", "prompt", "chosen", "rejected", "id"], "preference"),
        (["instruction", "output_1", "output_2", "preference", "annotator"], "alpaca_eval"),
    ])
    def test_known(self, columns, expected):
        assert detect_format(columns) == expected

    def test_unknown_lists_columns_and_formats(self):
        with pytest.raises(DataError) as info:
            detect_format(["question", "answer"])
        message = str(info.value)
        for word in ("question", "answer", "hh_rlhf", "preference", "alpaca_eval"):
            assert word in message

    def test_load_auto_detects_each_format(self, tmp_path):
        hh = write_jsonl(tmp_path / "hh.jsonl", [hh_row("\n\nHuman: hi\n\nAssistant:", " hello", " go away")])
        pref = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
        alpaca = tmp_path / "alpaca.json"
        alpaca.write_text(json.dumps([{"instruction": "Say hi", "output_1": "hi", "output_2": "yo",
                                       "preference": 2.0}]))
        assert load_preferences(str(hh)).format == "hh_rlhf"
        assert load_preferences(str(pref)).format == "preference"
        assert load_preferences(str(alpaca)).format == "alpaca_eval"

    def test_load_unknown_format_names_file(self, tmp_path):
        path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
        with pytest.raises(DataError, match="qa.jsonl.*cannot detect.*question"):
            load_preferences(str(path))

    def test_explicit_format_with_missing_column(self, tmp_path):
        path = write_jsonl(tmp_path / "hh.jsonl", [hh_row("\n\nHuman: hi\n\nAssistant:", " a", " b")])
        with pytest.raises(DataError, match="hh.jsonl.*'preference' needs column 'prompt'"):
            load_preferences(str(path), format="preference")

    def test_bad_format_and_limit_arguments(self, tmp_path):
        path = write_jsonl(tmp_path / "p.jsonl", PREF_ROWS)
        with pytest.raises(ValueError, match="format"):
            load_preferences(str(path), format="csv")
        with pytest.raises(ValueError, match="limit"):
            load_preferences(str(path), limit=0)


class TestHHRLHF:
    def test_multi_turn_prompt_is_up_to_last_assistant(self):
        prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
        parsed = parse_hh_rlhf([hh_row(prompt, " fine", " go away")], "x.jsonl")
        pairs, skipped = validate_pairs(parsed, "x.jsonl")
        assert skipped == []
        assert pairs.to_dict("records") == [
            {"id": "x.jsonl:0", "prompt": prompt, "chosen": " fine", "rejected": " go away"}]

    def test_rejected_with_other_prompt_is_bad(self, tmp_path):
        rows = [hh_row("\n\nHuman: a\n\nAssistant:", " x", " y"),
                {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}]
        path = write_jsonl(tmp_path / "hh.jsonl", rows)
        with pytest.raises(DataError) as info:
            load_preferences(str(path))
        assert "row 1 (id 'hh.jsonl:1')" in str(info.value)
        assert "field 'rejected'" in str(info.value)
        loaded = load_preferences(str(path), on_bad_row="skip")
        assert loaded.pairs["id"].tolist() == ["hh.jsonl:0"]
        assert [s["id"] for s in loaded.skipped] == ["hh.jsonl:1"]

    def test_chosen_without_assistant_turn_is_bad(self):
        parsed = parse_hh_rlhf([{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}], "x")
        with pytest.raises(DataError, match=r"row 0 \(id 'x:0'\): field 'chosen' has no"):
            validate_pairs(parsed, "x")

    def test_own_id_column_is_used(self):
        rows = [dict(hh_row("\n\nHuman: a\n\nAssistant:", " x", " y"), id=7)]
        pairs, _ = validate_pairs(parse_hh_rlhf(rows, "x"), "x")
        assert pairs["id"].tolist() == ["7"]


class TestPreference:
    @pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet"])
    def test_file_types(self, tmp_path, suffix):
        path = tmp_path / f"truthy{suffix}"
        if suffix == ".parquet":
            pd.DataFrame(PREF_ROWS).to_parquet(path)
        else:
            text = (json.dumps(PREF_ROWS, indent=2) if suffix.startswith(".json.")
                    or suffix == ".json" else "".join(json.dumps(r) + "\n" for r in PREF_ROWS))
            data = text.encode("utf-8")
            path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
        loaded = load_preferences(str(path))
        assert loaded.format == "preference" and loaded.skipped == []
        assert loaded.source == str(path)
        assert list(loaded.pairs.columns) == list(PAIR_COLUMNS)
        assert loaded.pairs.to_dict("records") == [
            {k: r[k] for k in PAIR_COLUMNS} for r in PREF_ROWS]

    def test_json_file_may_hold_json_lines(self, tmp_path):
        path = write_jsonl(tmp_path / "p.json", PREF_ROWS)
        assert len(load_preferences(str(path)).pairs) == 2

    def test_ids_default_to_file_name_and_row(self, tmp_path):
        rows = [{k: v for k, v in r.items() if k != "id"} for r in PREF_ROWS]
        path = write_jsonl(tmp_path / "noid.jsonl", rows)
        assert load_preferences(str(path)).pairs["id"].tolist() == ["noid.jsonl:0", "noid.jsonl:1"]

    def test_empty_prompt_is_valid(self):
        pairs, skipped = validate_pairs(parse_preference(
            [{"prompt": "", "chosen": "a", "rejected": "b"}], "x"), "x")
        assert len(pairs) == 1 and skipped == [] and pairs.loc[0, "prompt"] == ""

    def test_limit_applies_after_validation(self, tmp_path):
        rows = [{"id": "bad", "prompt": "p", "chosen": "", "rejected": "r"}] + [
            {"id": f"r{i}", "prompt": "p", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
        path = write_jsonl(tmp_path / "p.jsonl", rows)
        loaded = load_preferences(str(path), limit=2, on_bad_row="skip")
        assert loaded.pairs["id"].tolist() == ["r0", "r1"]
        assert [s["id"] for s in loaded.skipped] == ["bad"]


class TestAlpacaEval:
    @pytest.mark.parametrize("preference, chosen", [
        ("1", "one"), ("2", "two"), (1, "one"), (2, "two"), (1.0, "one"), (2.0, "two"),
        (1.2, "one"), (1.49, "one"), (1.51, "two"), (1.8, "two"), (" 2 ", "two"), ("1.7", "two"),
    ])
    def test_preference_values(self, preference, chosen):
        rows = [{"instruction": "i", "output_1": "one", "output_2": "two", "preference": preference}]
        pairs, _ = validate_pairs(parse_alpaca_eval(rows, "a.json"), "a.json")
        assert pairs.loc[0, "chosen"] == chosen
        assert pairs.loc[0, "rejected"] == ("two" if chosen == "one" else "one")
        assert pairs.loc[0, "prompt"] == "i"

    @pytest.mark.parametrize("preference", [1.5, "1.5", " 1.50 "])
    def test_a_tie_is_skipped_and_counted_not_an_error(self, preference):
        rows = [{"instruction": "i", "output_1": "one", "output_2": "two", "preference": "1"},
                {"instruction": "i", "output_1": "one", "output_2": "two", "preference": preference}]
        pairs, skipped = validate_pairs(parse_alpaca_eval(rows, "a.json"), "a.json")  # on_bad_row: error
        assert pairs["id"].tolist() == ["a.json:0"]
        assert skipped == [{"id": "a.json:1", "row": 1, "reason": "field 'preference' is 1.5, a tie (no "
                            "preference, so no label)", "tie": True}]

    @pytest.mark.parametrize("preference, words", [
        (None, "missing"), (float("nan"), "missing"), ("", "missing"),
        ("n/a", "not a number"), (3, "outside"), (0.0, "outside"), (True, "not a number"),
    ])
    def test_bad_preference(self, preference, words):
        rows = [{"instruction": "i", "output_1": "one", "output_2": "two", "preference": "1"},
                {"instruction": "i", "output_1": "one", "output_2": "two", "preference": preference}]
        parsed = parse_alpaca_eval(rows, "a.json")
        with pytest.raises(DataError) as info:
            validate_pairs(parsed, "a.json")
        message = str(info.value)
        assert message.startswith("a.json: row 1 (id 'a.json:1'): field 'preference'")
        assert words in message
        pairs, skipped = validate_pairs(parsed, "a.json", on_bad_row="skip")
        assert pairs["id"].tolist() == ["a.json:0"]
        assert len(skipped) == 1 and skipped[0]["id"] == "a.json:1" and skipped[0]["row"] == 1
        assert "preference" in skipped[0]["reason"]


# --------------------------------------------------------------------------- validation

GOOD = {"id": "ok", "prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize("bad, field, words", [
    ({"id": "x1", "prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"id": "x2", "prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing"),
    ({"id": "x3", "prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty"),
    ({"id": "x4", "prompt": "p", "chosen": "c", "rejected": " \n\t"}, "rejected", "empty"),
    ({"id": "x5", "prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"id": "x6", "prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "not a string"),
    ({"id": "x7", "chosen": "c", "rejected": "r"}, "prompt", "missing"),
    ({"id": "x8", "prompt": "p", "chosen": ["c"], "rejected": "r"}, "chosen", "not a string"),
    ({"id": "ok", "prompt": "p2", "chosen": "c2", "rejected": "r2"}, "id", "repeats the id of row 0"),
])
def test_bad_row(tmp_path, bad, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, dict(GOOD, id="last")])
    with pytest.raises(DataError) as info:
        load_preferences(str(path), format="preference")
    message = str(info.value)
    assert message.startswith(f"{path}: row 1 (id {bad['id']!r}): ")
    assert f"'{field}'" in message and words in message

    loaded = load_preferences(str(path), format="preference", on_bad_row="skip")
    assert loaded.pairs["id"].tolist() == ["ok", "last"]  # duplicates: the first one is kept
    assert loaded.pairs.loc[0, "chosen"] == "c"
    assert len(loaded.skipped) == 1
    assert loaded.skipped[0]["id"] == bad["id"] and loaded.skipped[0]["row"] == 1
    assert field in loaded.skipped[0]["reason"] and words in loaded.skipped[0]["reason"]


def test_missing_id_reports_row_index():
    df = pd.DataFrame([GOOD, dict(GOOD, id=None), dict(GOOD, id="  ")])
    with pytest.raises(DataError, match=r"^src: row 1: field 'id' is missing$"):
        validate_pairs(df, "src")
    pairs, skipped = validate_pairs(df, "src", on_bad_row="skip")
    assert len(pairs) == 1
    assert skipped == [{"id": None, "row": 1, "reason": "field 'id' is missing"},
                       {"id": None, "row": 2, "reason": "field 'id' is empty"}]


def test_missing_column_raises_in_both_modes():
    df = pd.DataFrame([{"id": "a", "prompt": "p", "chosen": "c"}])
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match="src: column 'rejected' is missing"):
            validate_pairs(df, "src", on_bad_row=mode)


def test_bad_on_bad_row_value():
    with pytest.raises(ValueError, match="on_bad_row") as info:
        validate_pairs(pd.DataFrame([GOOD]), "src", on_bad_row="ignore")
    assert not isinstance(info.value, DataError)
    with pytest.raises(ValueError, match="on_bad_row"):
        load_preferences("whatever.jsonl", on_bad_row="drop")


def test_output_shape_and_id_types():
    df = pd.DataFrame([dict(GOOD, id=3, extra=1), dict(GOOD, id=4.0, chosen="c2")], index=[10, 20])
    pairs, skipped = validate_pairs(df, "src")
    assert skipped == []
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert list(pairs.index) == [0, 1]
    assert pairs["id"].tolist() == ["3", "4"]
    assert all(isinstance(i, str) for i in pairs["id"])


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [dict(GOOD, chosen="")])
    with pytest.raises(DataError, match="no valid pairs"):
        load_preferences(str(path), on_bad_row="skip")


# --------------------------------------------------------------------------- files and hub

def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, id="b")) + "\n{\"id\": \"c\", \n")
    with pytest.raises(DataError) as info:
        load_preferences(str(path))
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_malformed_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + "{oops}\n]")
    with pytest.raises(DataError, match=r"broken\.json: line 3"):
        read_rows(path)


def test_non_object_json_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl: line 2: expected a JSON object"):
        read_rows(path)


def test_unknown_extension_names_file(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("id,prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"pairs\.csv.*unknown file type"):
        load_preferences(str(path))


@pytest.mark.parametrize("name, content", [
    ("corrupt.jsonl.gz", b"this is not gzip"),
    ("corrupt.parquet", b"this is not parquet"),
    ("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1")),
])
def test_unreadable_file_names_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{name}: cannot read file"):
        load_preferences(str(path))


def test_missing_local_file_is_not_tried_on_the_hub(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_preferences(str(path))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_preferences(str(tmp_path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: contains no rows"):
        load_preferences(str(path))


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read HF_HUB_OFFLINE at import; patch the constants if they are already loaded
    for module_name in ("datasets.config", "huggingface_hub.constants"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_preferences("no-such-org/no-such-dataset")
    message = str(info.value)
    assert "'no-such-org/no-such-dataset'" in message
    assert "hub" in message and "local" in message


def test_is_missing_nan_ids_from_pandas():
    # pandas turns an id column with gaps into floats; the gap is a missing id, not "nan"
    df = pd.DataFrame([dict(GOOD, id=1), {k: v for k, v in GOOD.items() if k != "id"}])
    assert math.isnan(df.loc[1, "id"])
    with pytest.raises(DataError, match=r"row 1: field 'id' is missing"):
        validate_pairs(df, "src")
