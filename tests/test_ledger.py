"""The privacy ledger: one RR draw per dataset, never silently redrawn, an epsilon list costs epsilon_max.

Each test names the audit finding it covers (issue: privacy ledger).
"""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import binomtest

from props_ray.config import validate_job
from props_ray.data.ledger import Ledger, LedgerError, dataset_fingerprint
from props_ray.data.prepare import prepare_data
from props_ray.privacy.randomized_response import flip_probability


def _pairs(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [f"p{i:05d}" for i in range(n)],
                         "prompt": [f"question {rng.integers(10**9)}" for _ in range(n)],
                         "chosen": [f"good {i}" for i in range(n)], "rejected": [f"bad {i}" for i in range(n)]})


def _ledger(tmp_path, pairs, eps=1.0, secure=True, seed=0, accept=None, job="j"):
    ledger = Ledger.open(tmp_path, pairs, source="test", secure=secure, seed=seed)
    ledger.ensure_draw(pairs, eps, accept_new_draw=accept, seed=seed, job=job)
    return ledger


def _flipped(privatized, raw):
    return (privatized.set_index("id")["chosen"] != raw.set_index("id")["chosen"]).to_numpy()


# -- finding 1: a lost draw is a refusal, never a silent redraw ---------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "truncate", "alter"])
def test_lost_or_altered_draw_is_refused(tmp_path, damage):
    pairs = _pairs(500)
    ledger = _ledger(tmp_path, pairs)
    draw = ledger.root / ledger.current.file
    before = ledger.labels(pairs, 1.0)
    if damage == "delete":
        draw.unlink()
    elif damage == "truncate":
        draw.write_bytes(draw.read_bytes()[:100])
    else:
        table = pd.read_parquet(draw)
        table.loc[0, "prefers_first"] = not table.loc[0, "prefers_first"]
        table.to_parquet(draw, index=False)
    again = Ledger.open(tmp_path, pairs, source="test", secure=True, seed=0)
    with pytest.raises(LedgerError, match=r"(missing|altered or truncated).*spend privacy again.*accept_new_draw=2"):
        again.ensure_draw(pairs, 1.0, accept_new_draw=None, seed=0, job="j")
    with pytest.raises(LedgerError, match="missing|altered"):
        again.labels(pairs, 1.0)
    # the explicit opt-in draws once more, and the cumulative label-epsilon says so
    again.ensure_draw(pairs, 1.0, accept_new_draw=2, seed=0, job="j")
    assert [d.number for d in again.draws] == [1, 2] and again.cumulative_epsilon == 2.0
    redrawn = again.labels(pairs, 1.0)
    assert (redrawn["chosen"] != before["chosen"]).any()  # a genuinely new draw
    # re-running the same job (same opt-in) does not draw a third time
    third = Ledger.open(tmp_path, pairs, source="test", secure=True, seed=0)
    third.ensure_draw(pairs, 1.0, accept_new_draw=2, seed=0, job="j")
    assert len(third.draws) == 2
    pd.testing.assert_frame_equal(third.labels(pairs, 1.0), redrawn)


def test_deleted_ledger_is_noticed_and_an_interrupted_write_is_adopted(tmp_path):
    pairs = _pairs(300)
    ledger = _ledger(tmp_path, pairs)
    (ledger.root / "ledger.json").unlink()
    for f in ledger.root.glob("draw-*.parquet"):
        f.unlink()
    with pytest.raises(LedgerError, match="is gone"):
        Ledger.open(tmp_path, pairs, source="test", secure=True, seed=0)

    other = _pairs(300, seed=1)
    ledger = Ledger.open(tmp_path, other, source="test", secure=True, seed=0)
    ledger.ensure_draw(other, 0.5, accept_new_draw=None, seed=0, job="j")
    state = json.loads((ledger.root / "ledger.json").read_text())
    state["draws"] = []  # as if the process died between the draw file and the ledger write
    (ledger.root / "ledger.json").write_text(json.dumps(state))
    back = Ledger.open(tmp_path, other, source="test", secure=True, seed=0)
    assert [d.number for d in back.draws] == [1] and back.cumulative_epsilon == 0.5  # counted, not discarded
    pd.testing.assert_frame_equal(back.labels(other, 0.5), ledger.labels(other, 0.5))


# -- finding 2: keyed by the data, not by job name, K or seed -----------------------------------------------------
def _file_job(tmp_path, path, **over):
    raw = {"name": "a", "seed": 0, "output_dir": str(tmp_path / "runs"), "stages": 2,
           "data": {"source": str(path), "eval_prompts": 20},
           "eval": {"judge": "some/reward-model"}, "privacy": {"epsilons": [1.0]},
           "methods": [{"method": "rr"}]}
    for k, v in over.items():
        raw[k] = v
    return validate_job(raw)


def test_job_name_k_and_seed_change_partitions_never_the_draw(tmp_path):
    pairs = _pairs(600)
    path = tmp_path / "pairs.jsonl"
    pairs.to_json(path, orient="records", lines=True)
    first = prepare_data(_file_job(tmp_path, path))
    first.ledger.ensure_draw(first.dataset, 1.0, accept_new_draw=None, seed=0, job="a")
    labels = first.ledger.labels(first.dataset, 1.0).set_index("id")["chosen"]
    for over in ({"name": "b"}, {"stages": 3}, {"seed": 5}, {"name": "c", "seed": 9, "stages": 4}):
        data = prepare_data(_file_job(tmp_path, path, **over))
        assert data.ledger.root == first.ledger.root and data.ledger_action == "reuse"
        data.ledger.ensure_draw(data.dataset, 1.0, accept_new_draw=None, seed=over.get("seed", 0), job="x")
        assert len(data.ledger.draws) == 1
        for part in data.partitions:
            got = data.ledger.labels(part, 1.0).set_index("id")["chosen"]
            assert (got == labels.loc[got.index]).all()
    moved = prepare_data(_file_job(tmp_path, path, seed=5))
    assert [set(p["id"]) for p in moved.partitions] != [set(p["id"]) for p in first.partitions]
    # the same content from another file is the same dataset
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    assert prepare_data(_file_job(tmp_path, copy)).ledger.root == first.ledger.root


def test_fingerprint_is_the_same_whichever_response_a_label_prefers():
    pairs = _pairs(200)
    swapped = pairs.rename(columns={"chosen": "rejected", "rejected": "chosen"})
    assert dataset_fingerprint(swapped) == dataset_fingerprint(pairs)
    assert dataset_fingerprint(pairs.sample(frac=1, random_state=0)) == dataset_fingerprint(pairs)
    changed = pairs.copy()
    changed.loc[3, "prompt"] = "something else"
    assert dataset_fingerprint(changed) != dataset_fingerprint(pairs)


# -- finding 3: an epsilon list costs epsilon_max ----------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_derived_labels_flip_at_gamma_eps_against_the_raw_label(tmp_path, eps):
    pairs = _pairs(30_000)
    ledger = _ledger(tmp_path, pairs, eps=2.0)
    flips = int(_flipped(ledger.labels(pairs, eps), pairs).sum())
    assert binomtest(flips, len(pairs), flip_probability(eps)).pvalue > 1e-3
    assert binomtest(flips, len(pairs), flip_probability(2.0)).pvalue < 1e-6
    assert binomtest(flips, len(pairs), flip_probability(eps) * 1.1).pvalue < 1e-3


def test_derived_labels_are_a_function_of_the_draw_alone(tmp_path):
    """Swap every raw label: the draw file is the same, so every derived label must be the same."""
    pairs = _pairs(2000)
    ledger = _ledger(tmp_path, pairs, eps=2.0)
    swapped = pairs.rename(columns={"chosen": "rejected", "rejected": "chosen"})[pairs.columns]
    for eps in (0.1, 0.5, 2.0):
        pd.testing.assert_frame_equal(ledger.labels(swapped, eps), ledger.labels(pairs, eps))
    assert ledger.cumulative_epsilon == 2.0 and len(ledger.draws) == 1


def test_an_epsilon_list_draws_once_at_the_largest(tmp_path):
    path = tmp_path / "pairs.jsonl"
    _pairs(400).to_json(path, orient="records", lines=True)
    cfg = _file_job(tmp_path, path, privacy={"epsilons": [0.1, 0.5, 1, 2]})
    data = prepare_data(cfg)
    data.ledger.ensure_draw(data.dataset, 2.0, accept_new_draw=None, seed=0, job="a")
    assert data.ledger.cumulative_epsilon == 2.0  # not 0.1 + 0.5 + 1 + 2 = 3.6
    assert len(list(data.ledger.root.glob("draw-*.parquet"))) == 1
    # a later job asking for more is refused with what a new draw would cost
    with pytest.raises(LedgerError, match=r"epsilon 4.*holds draw 1 at epsilon 2.*2 \+ 4 = 6"):
        prepare_data(_file_job(tmp_path, path, privacy={"epsilons": [4]}))


# -- finding 6: randomness ---------------------------------------------------------------------------------------
def test_secure_ledger_writes_no_seed_and_a_resume_compares_the_flag(tmp_path):
    pairs = _pairs(300)
    ledger = _ledger(tmp_path, pairs, secure=True, seed=1234)
    text = (ledger.root / "ledger.json").read_text()
    assert "seed" not in json.loads(text) and all("seed" not in d for d in json.loads(text)["draws"])
    meta = json.loads(pq.read_schema(ledger.root / ledger.current.file).metadata[b"props_ray.ledger_draw"])
    assert "seed" not in meta
    with pytest.raises(LedgerError, match="secure randomness.*seeded"):
        Ledger.open(tmp_path, pairs, source="test", secure=False, seed=1234)

    seeded = _ledger(tmp_path / "s", pairs, secure=False, seed=7)
    assert json.loads((seeded.root / "ledger.json").read_text())["seed"] == 7
    with pytest.raises(LedgerError, match="seeded labels can be replayed"):
        Ledger.open(tmp_path / "s", pairs, source="test", secure=True, seed=7)


def test_secure_draws_and_keys_are_not_replayable(tmp_path):
    pairs = _pairs(2000)
    a, b = _ledger(tmp_path / "a", pairs, secure=True, seed=0), _ledger(tmp_path / "b", pairs, secure=True, seed=0)
    assert a.partition_key != b.partition_key
    assert (a.labels(pairs, 1.0)["chosen"] != b.labels(pairs, 1.0)["chosen"]).any()
    c, d = _ledger(tmp_path / "c", pairs, secure=False, seed=3), _ledger(tmp_path / "d", pairs, secure=False, seed=3)
    pd.testing.assert_frame_equal(c.labels(pairs, 1.0), d.labels(pairs, 1.0))  # seeded: reproducible


def test_no_raw_label_in_the_ledger(tmp_path):
    pairs = _pairs(5000)
    ledger = _ledger(tmp_path, pairs, eps=0.5)
    table = pd.read_parquet(ledger.root / ledger.current.file)
    assert list(table.columns) == ["id", "prefers_first"]
    truth_first = (pairs["chosen"] < pairs["rejected"]).to_numpy()
    agree = (table.set_index("id")["prefers_first"].loc[pairs["id"]].to_numpy() == truth_first).mean()
    assert abs(agree - (1 - flip_probability(0.5))) < 0.03
    text = (ledger.root / "ledger.json").read_text()
    assert "good 1" not in text and "question" not in text


# -- finding 7: embedded evaluation prompts are held out ---------------------------------------------------------
def test_embedded_eval_prompts_are_never_trained_on(tmp_path):
    cfg = validate_job({"name": "e", "output_dir": str(tmp_path), "data": {"num_pairs": 3000, "eval_prompts": 200},
                        "methods": [{"method": "rr"}]})
    data = prepare_data(cfg)
    trained = set(pd.concat(data.partitions)["prompt"])
    assert len(data.eval_prompts) == 200 and not trained & set(data.eval_prompts)
    assert data.num_pairs < 3000


# -- N-dependent refusals at data load ----------------------------------------------------------------------------
def test_n_dependent_errors_come_at_data_load_before_any_draw(tmp_path):
    from props_ray.data.records import DataError
    from props_ray.privacy.accounting import PrivacyConfigError

    raw = {"name": "n", "output_dir": str(tmp_path), "data": {"num_pairs": 300, "eval_prompts": 20},
           "methods": [{"method": "rr"}, {"method": "dpsgd"}]}
    with pytest.raises(PrivacyConfigError, match=r"privacy\.dpsgd\.delta"):
        prepare_data(validate_job({**raw, "privacy": {"dpsgd": {"delta": 0.01}}}))
    with pytest.raises(DataError, match="more than the"):
        prepare_data(validate_job({**raw, "stages": 400}))
    assert not list(tmp_path.rglob("draw-*.parquet"))  # refused before anything was drawn
