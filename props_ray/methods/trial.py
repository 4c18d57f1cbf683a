"""One trial (a method at one epsilon, in one variant of a job) and the pieces every recipe shares.

A recipe (``props_ray/methods/<method>.py``) reads top to bottom: it takes the trial's partitions
(raw labels, or the ledger's randomized-response labels), trains its stages through
:meth:`Trial.train`, relabels through :meth:`Trial.relabel` where it needs to, evaluates the final
model with :meth:`Trial.evaluate` and returns :meth:`Trial.outcome`. Nothing here talks to
MLflow: a trial runs in the driver or in a Ray task, and the driver logs its outcome
(:mod:`props_ray.run_tree`). Progress is kept in the trial's ``state.json`` (checkpoints, relabels),
so a re-run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from props_ray import progress
from props_ray.privacy.randomized_response import flip_probability
from props_ray.win_rate import WinRate, label_accuracy, reward_summary, win_rate

#: A trial's per-comparison judge scores (policy and reference), logged as an artifact.
EVAL_SCORES = "eval-scores.json"

if TYPE_CHECKING:
    from props_ray.config import JobConfig
    from props_ray.data.prepare import PreparedData
    from props_ray.sections import MethodSection


def trial_name(method: "MethodSection", epsilon: float | None) -> str:
    return method.display_name if epsilon is None else f"{method.display_name}-eps{epsilon:g}"


def generate(cfg: "JobConfig", data: "PreparedData", base_path: str, adapter_path: str | None) -> pd.DataFrame:
    """Samples on the held-out prompts from the reference (``adapter_path`` None) or a trained policy."""
    from props_ray.generation import batch_rows, generate as sample

    return sample(data.eval_prompts, base_path=base_path, adapter_path=adapter_path, model_cfg=cfg.model,
                  samples_per_prompt=cfg.eval.samples_per_prompt,
                  max_new_tokens=cfg.eval.max_new_tokens or cfg.task.response_length,
                  temperature=cfg.eval.temperature, seed=cfg.seed + (0 if adapter_path is None else 1),
                  max_prompt_length=cfg.data.max_prompt_length, fixed_length=cfg.is_embedded,
                  use_gpu=cfg.train.use_gpu, num_actors=1, batch_size=batch_rows(cfg))


@dataclass
class Trial:
    cfg: "JobConfig"  # the (seed, K) variant the trial belongs to
    method: "MethodSection"
    epsilon: float | None
    name: str
    dir: Path
    data: "PreparedData"
    base_path: str
    judge: object
    reference_scores: object
    say: Callable[[str], None] = progress.say
    in_task: bool = False  # running as a Ray task beside other trials
    timings: dict[str, float] = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        self.state_path = self.dir / "state.json"
        if not self.state and self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        self.state.setdefault("stages", {})
        self.started = time.time()

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state, indent=1))

    @property
    def checkpoints(self) -> dict[str, dict]:
        return self.state["stages"]

    def add_time(self, part: str, seconds: float) -> None:
        key = f"{self.name}:{part}"
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    # -- data ---------------------------------------------------------------------------------
    def raw_partitions(self) -> dict[int, pd.DataFrame]:
        """Stage -> the stage's pairs with their raw labels (non-private, and DP-SGD's central model)."""
        return {k: self.data.partition(k)[["id", "prompt", "chosen", "rejected"]]
                for k in range(1, self.cfg.stages + 1)}

    def randomized_response_partitions(self) -> dict[int, pd.DataFrame]:
        """Stage -> the stage's pairs in their epsilon-RR orientation: the ledger's one draw, derived down
        to this trial's epsilon (post-processing). Drawn by the driver before any trial started."""
        return {k: self.data.ledger.labels(self.data.partition(k), self.epsilon)
                for k in range(1, self.cfg.stages + 1)}

    # -- training -----------------------------------------------------------------------------
    def train(self, stages: list[int], pairs: dict[int, pd.DataFrame], loss: str,
              init_adapter: str | None = None) -> list[dict]:
        """Train ``stages`` in order in one Ray Train run (resuming a run of the same name); records
        and returns one checkpoint per stage. Stages already checkpointed are not trained again."""
        from props_ray.data.tokenize_step import to_training_dataset
        from props_ray.train.trainer import fit_stages

        todo = [k for k in stages if str(k) not in self.checkpoints]
        if todo:
            cfg = self.cfg
            tok = self.base_path if cfg.model.tokenizer is None else cfg.model.tokenizer
            datasets = {k: to_training_dataset(pairs[k], tok, cfg.data.max_prompt_length,
                                               cfg.data.max_response_length) for k in todo}
            if self.in_task:  # trials running at once: tokenize before the trainer reserves its workers'
                # CPUs, or every trainer could hold CPUs while its datasets wait for one to tokenize
                datasets = {k: ds.materialize() for k, ds in datasets.items()}
            flip = flip_probability(self.epsilon) if (self.epsilon is not None and loss == "robust") else None
            t = time.time()
            cks = fit_stages(cfg, run_name=f"{self.name}-stages-{'-'.join(map(str, todo))}", trial=self.name,
                             method=self.method.method, stages=todo, datasets=datasets,
                             base_path=self.base_path, init_adapter=init_adapter, loss=loss, flip_rate=flip,
                             num_pairs=sum(len(pairs[k]) for k in todo),
                             extra={"epsilon": self.epsilon, "total_pairs": self.data.num_pairs})
            self.add_time("train", time.time() - t)
            progress.end(self.name, f"trained stage{'s' * (len(todo) > 1)} {', '.join(map(str, todo))}",
                         time.time() - t)
            for c in cks:
                self.checkpoints[str(c.stage)] = {
                    "stage": c.stage, "path": c.path, "model_path": c.model_path,
                    "metrics": {k: v for k, v in c.metrics.items() if isinstance(v, (int, float, str, bool))}}
            self.save()
        return [self.checkpoints[str(k)] for k in stages]

    def train_reward_model(self, stage: int, pairs: pd.DataFrame, epsilon: float | None, lr: float | None) -> dict:
        """The reward model on ``pairs`` (Bradley-Terry; DP-SGD at ``epsilon`` with the pair as the unit), as
        stage ``stage``; resumed, not retrained. Delta comes from the whole training set's size."""
        from props_ray.train.trainer import fit_reward_model

        if str(stage) not in self.checkpoints:
            cfg = self.cfg if lr is None else self.cfg.model_copy(
                update={"train": self.cfg.train.model_copy(update={"lr": lr})})
            t = time.time()
            ck = fit_reward_model(cfg, pairs, self.base_path, name=f"{self.name}-reward-model", epsilon=epsilon,
                                  total_pairs=self.data.num_pairs)
            self._record(ck, stage, "train", time.time() - t, "the reward model", f"{self.name}-reward-model")
        return self.checkpoints[str(stage)]

    def private_prompts(self) -> list[str]:
        """The prompts of every partition: the private instructions (DP synthetic instructions' unit)."""
        return [p for k in range(1, self.cfg.stages + 1) for p in self.data.partition(k)["prompt"]]

    def train_generator(self, stage: int, prompts: list[str], epsilon: float | None, compose_with: list,
                        epochs: int, lr: float) -> dict:
        """The synthetic-instruction generator on ``prompts`` (DP-SGD with the prompt as the unit, within
        ``epsilon`` together with the ``compose_with`` mechanisms), as stage ``stage``; resumed, not
        retrained. Delta comes from the data's size."""
        from props_ray.train.trainer import fit_generator

        if str(stage) not in self.checkpoints:
            train = self.cfg.train.model_copy(update={"epochs": epochs, "lr": lr})
            t = time.time()
            ck = fit_generator(self.cfg.model_copy(update={"train": train}), prompts, self.base_path,
                               name=f"{self.name}-generator", epsilon=epsilon, compose_with=compose_with,
                               total_pairs=self.data.num_pairs)
            self._record(ck, stage, "train", time.time() - t, "the generator", f"{self.name}-generator")
        return self.checkpoints[str(stage)]

    def train_ppo(self, stage: int, prompts: list[str], reward_model: dict, epsilon: float | None,
                  ppo: dict) -> dict:
        """PPO from the reference on ``prompts`` against the stage ``reward_model`` (DP-PPO at ``epsilon``:
        the prompt as the unit), as stage ``stage``; resumed, not retrained."""
        from props_ray.train.trainer import fit_ppo

        if str(stage) not in self.checkpoints:
            t = time.time()
            ck = fit_ppo(self.cfg, prompts, self.base_path, reward_model["model_path"], name=f"{self.name}-ppo",
                         epsilon=epsilon, ppo=ppo, total_pairs=self.data.num_pairs)
            self._record(ck, stage, "train", time.time() - t, "PPO", f"{self.name}-ppo")
        return self.checkpoints[str(stage)]

    def _record(self, ck, stage: int, part: str, seconds: float, what: str, run: str) -> None:
        self.add_time(part, seconds)
        progress.end(run, f"trained {what} (stage {stage})", seconds, label=self.name)
        self.checkpoints[str(stage)] = {
            "stage": stage, "path": ck.path, "model_path": ck.model_path,
            "metrics": {k: v for k, v in ck.metrics.items() if isinstance(v, (int, float, str, bool))}}
        self.save()

    def relabel(self, stage: int, privatized: pd.DataFrame, previous: dict, rule: str,
                **options) -> tuple[pd.DataFrame, dict]:
        """The ``previous`` stage model scores ``stage``'s pairs (Ray Data batch inference) and its label is
        combined with their RR labels by ``rule``. Persisted, so a resumed trial reuses it, never redoes it."""
        from props_ray.data.tokenize_step import to_training_dataset
        from props_ray.relabel import apply_combination, score_partition

        done = self.state.setdefault("relabel", {})
        path = self.dir / f"labels-stage-{stage}.parquet"
        if str(stage) in done and path.exists():
            return pd.read_parquet(path), done[str(stage)]
        cfg = self.cfg
        t = time.time()
        tok = self.base_path if cfg.model.tokenizer is None else cfg.model.tokenizer
        ds = to_training_dataset(privatized, tok, cfg.data.max_prompt_length, cfg.data.max_response_length,
                                 keep_id=True)
        margins = score_partition(ds, base_path=self.base_path, adapter_path=previous["model_path"],
                                  model_cfg=cfg.model, beta=cfg.train.beta, use_gpu=cfg.train.use_gpu)
        combined, comb = apply_combination(privatized, margins, self.epsilon, rule, **options)
        combined.to_parquet(path, index=False)  # derived from privatized labels only
        self.add_time("relabel", time.time() - t)
        info = {"disagreement": comb.disagreement, "model_error": comb.model_error,
                "model_error_bound": comb.model_error_bound,
                "calibration_scale": comb.calibration_scale, "flipped_fraction": float(comb.flipped.mean()),
                "relabel_seconds": time.time() - t}
        self.say(f"[relabel stage {stage}] model disagrees with RR on {comb.disagreement:.1%} of pairs; "
                 + (f"gamma_M={comb.model_error:.3f}; " if comb.model_error is not None else "")
                 + (f"upper bound {comb.model_error_bound:.3f}; " if comb.model_error_bound is not None else "")
                 + f"{comb.flipped.mean():.1%} of labels flipped ({info['relabel_seconds']:.1f}s)")
        done[str(stage)] = info
        self.save()
        return combined, info

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, final: dict) -> tuple[WinRate, float]:
        """Win rate of the final model's generations against the reference's, and their mean reward, by
        the job's judge; CIs clustered by prompt. The per-comparison scores (numbers only) are kept in
        ``eval-scores.json`` for head-to-head comparisons between methods."""
        t = time.time()
        scores = np.asarray(self.judge.score(generate(self.cfg, self.data, self.base_path, final["model_path"])))
        reference = np.asarray(self.reference_scores)
        prompt = np.arange(len(scores)) // self.cfg.eval.samples_per_prompt  # rows are in prompt order
        win = win_rate(scores, reference, groups=prompt)
        self.state["eval_metrics"] = reward_summary(scores, reference, prompt)
        (self.dir / EVAL_SCORES).write_text(json.dumps({"samples_per_prompt": self.cfg.eval.samples_per_prompt,
                                                        "policy": scores.tolist(), "reference": reference.tolist()}))
        if self.cfg.audit.canaries:
            self.state["eval_metrics"].update(self.audit(final))
        seconds = time.time() - t
        self.add_time("eval", seconds)
        return win, seconds

    def audit(self, final: dict) -> dict:
        """The canary audit of the released model: it guesses each canary's secret label from its implicit
        reward margin (Ray Data batch inference, as a relabel), and the Clopper--Pearson bound on the
        guesses' accuracy gives a lower bound on epsilon (with the trial's delta for (epsilon, delta)
        methods), guessing all canaries or only the most confident, over all stages or in one stage's partition
        (:func:`abstaining_epsilon_lower_bound`).
        Only counts of right guesses leave this step."""
        from props_ray.data.tokenize_step import to_training_dataset
        from props_ray.privacy.audit import abstaining_epsilon_lower_bound
        from props_ray.relabel import score_partition

        canaries = self.data.canaries()
        tok = self.cfg.model.tokenizer or self.base_path
        ds = to_training_dataset(canaries, tok, self.cfg.data.max_prompt_length, self.cfg.data.max_response_length,
                                 keep_id=True)
        margins = score_partition(ds, base_path=self.base_path, adapter_path=final["model_path"],
                                  model_cfg=self.cfg.model, beta=self.cfg.train.beta, use_gpu=self.cfg.train.use_gpu)
        margin = canaries[["id"]].merge(margins, on="id", how="left")["margin"].to_numpy()
        if np.isnan(margin).any():
            raise RuntimeError(f"the audit scored {int((~np.isnan(margin)).sum())} of {len(margin)} canaries")
        rng = np.random.default_rng([self.cfg.seed, 0xA0D17])
        right = np.where(margin == 0, rng.random(len(margin)) < 0.5, margin > 0)  # a tie is a coin
        # "chosen" holds the coin's pick, so guessing "chosen" is right; the most confident guesses are
        # those with the largest |margin|, and the auditor may abstain on the rest
        delta = 0.0 if self.method.privacy_unit in ("label", "none") else self.delta()
        stage = {i: k for k, part in enumerate(self.data.partitions, start=1) for i in part["id"]}
        best = abstaining_epsilon_lower_bound(np.abs(margin), right, delta, self.cfg.audit.alpha,
                                              groups=canaries["id"].map(stage).to_numpy(), seed=self.cfg.seed)
        return {"audit_canaries": len(canaries), "audit_correct": int(right.sum()),
                "audit_accuracy": float(right.mean()), "audit_guesses": best["guesses"],
                "audit_guess_accuracy": best["correct"] / best["guesses"],
                "audit_guess_stage": int(best["group"] or 0),  # 0: the guesses spanned every stage's canaries
                "audit_epsilon_lower_bound": best["epsilon"]}

    def delta(self) -> float:
        """The job's DP-SGD delta for this data (default N^-1.1), as every (epsilon, delta) stage uses it."""
        from props_ray.privacy.accounting import resolve_delta

        return resolve_delta(self.cfg.privacy.dpsgd.delta, self.data.num_pairs)

    def label_accuracy(self, used: dict[int, pd.DataFrame]) -> tuple[float | None, list[float]]:
        """Fraction of the trained-on labels that equal the true ones, overall and per stage (the embedded
        task, or an opt-in). Only these aggregates leave the data step."""
        if not self.cfg.want_label_accuracy:
            return None, []
        truth = self.data.truth()
        stages = [label_accuracy(used[k], truth) for k in range(1, self.cfg.stages + 1)]
        return label_accuracy(pd.concat(used.values(), ignore_index=True), truth), stages

    def outcome(self, used: dict[int, pd.DataFrame], win: WinRate, eval_seconds: float, *,
                label_acc: tuple[float | None, list[float]] = (None, []), stage_info: dict | None = None,
                extra: dict | None = None) -> dict:
        """What the driver logs; stored in ``state.json`` so a driver that stopped before logging it
        logs it on the re-run without training again."""
        acc, stage_acc = label_acc
        self.state["outcome"] = {"stage_info": {str(k): v for k, v in (stage_info or {}).items()},
                                 "stage_pairs": {str(k): len(p) for k, p in used.items()},
                                 "win": win.as_dict(), "label_accuracy": acc, "stage_label_accuracy": stage_acc,
                                 "extra": {**self.state.get("eval_metrics", {}), **(extra or {})},
                                 "eval_seconds": eval_seconds, "started": self.started,
                                 "finished": time.time()}
        self.save()
        return self.state["outcome"]
