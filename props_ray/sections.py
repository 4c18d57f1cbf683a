"""The base of every config section, and each method's own section: what ``methods[i]`` of a job may say.

Every section forbids unknown keys, so a typo is an error that names the field. A method's section
also answers what the harness asks of the method (its labels, its engine, its MLflow params, the
job settings it refuses); its recipe is in ``props_ray/methods/<method>.py``. A new method adds its
section here (and to :data:`METHOD_SECTIONS`) and its recipe to the registry in
``props_ray/methods/__init__.py``. This module imports nothing of the project, so the config can
use it without importing any recipe.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSection(Section):
    """What every method's section has: its name in the registry, a display name, and its epsilons;
    and what the harness asks of a method (class attributes and hooks a method's section overrides)."""

    method: str
    name: str | None = Field(None, description="display name (default: the method's own)")
    epsilons: list[float] | None = Field(None, description="override privacy.epsilons for this method")

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v):
        if v is not None and not v:
            raise ValueError("an empty list runs no trial of this method; leave it out to use privacy.epsilons")
        if v is not None and any(not (e > 0 and math.isfinite(e)) for e in v):
            raise ValueError("every epsilon must be a finite number > 0")
        return v

    #: False for a method without a privacy budget (one trial, epsilon 'inf').
    private: ClassVar[bool] = True
    #: 'raw' or 'randomized_response' (the ledger's draw): what the method's trials train on.
    labels: ClassVar[str] = "raw"
    #: The training loop's engine: 'standard' (DDP) or 'dpsgd' (Opacus, noise once per step).
    engine: ClassVar[str] = "standard"
    #: Trials that take longest start first when trials run at once.
    long_running: ClassVar[bool] = False
    #: Final-checkpoint metrics logged as params of each stage run (the mechanism's parameters).
    stage_params: ClassVar[tuple[str, ...]] = ()
    #: What one neighbouring dataset differs in (logged with each trial, shown by ``report``).
    privacy_unit: ClassVar[str] = "label"

    @property
    def display_name(self) -> str:
        return self.name or self.default_name()

    def default_name(self) -> str:
        return self.method

    def stage_loss(self, stage: int) -> str:
        """The DPO loss stage ``stage`` trains with."""
        return getattr(self, "loss", None) or "sigmoid"

    def params(self, stages: int) -> dict:
        """The method's own MLflow params of a trial (beyond those every trial logs)."""
        return {}

    def result_params(self, checkpoints: dict[str, dict], job) -> dict:
        """MLflow params known once the trial has trained (e.g. DP-SGD's calibrated noise), from its
        stage checkpoints (``{"1": {"metrics": ...}, ...}``)."""
        return {}

    def check_job(self, job) -> str | None:
        """Why the job's other settings cannot run this method (a config error naming the field), or None."""
        return None


class NonprivateSection(MethodSection):
    method: Literal["nonprivate"]
    loss: Literal["sigmoid", "robust", "soft"] | None = None

    private: ClassVar[bool] = False  # no epsilon: one trial
    labels: ClassVar[str] = "raw"
    privacy_unit: ClassVar[str] = "none"

    @model_validator(mode="after")
    def _loss(self):
        if self.loss == "robust":
            raise ValueError("the robust loss needs a flip rate; method 'nonprivate' has none")
        if self.loss == "soft":
            raise ValueError("the soft loss needs per-pair confidence, which method 'nonprivate' does not produce")
        return self


class RRSection(MethodSection):
    method: Literal["rr"]
    loss: Literal["sigmoid", "robust", "soft"] | None = None

    labels: ClassVar[str] = "randomized_response"

    @model_validator(mode="after")
    def _loss(self):
        if self.loss == "soft":
            raise ValueError("the soft loss needs per-pair confidence, which method 'rr' does not produce")
        return self


class PropsSection(MethodSection):
    method: Literal["props"]
    loss: Literal["sigmoid", "robust", "soft"] | None = Field(
        None, description="stage 1: sigmoid (default) or robust (uses gamma_eps); later stages: sigmoid trains on "
                          "the combined hard label, soft on its confidence (for mle the rule's own posterior; "
                          "default: soft for rule posterior, sigmoid for mle)")
    rule: Literal["mle", "posterior"] = "mle"
    model_error_confidence: float | None = Field(
        None, gt=0.5, lt=1.0, description="rule mle: use this upper confidence bound on the stage model's "
                                          "error gamma_M instead of its point estimate (e.g. 0.95)")

    labels: ClassVar[str] = "randomized_response"
    long_running: ClassVar[bool] = True  # a training run per stage, relabels between: scheduled first

    @model_validator(mode="after")
    def _consistent(self):
        if self.model_error_confidence is not None and self.rule != "mle":
            raise ValueError("model_error_confidence applies to method 'props' with rule 'mle' only")
        return self

    def default_name(self) -> str:
        return f"props-{self.rule}"

    def stage_loss(self, stage: int) -> str:
        if stage > 1:  # combined labels: hard (sigmoid) or confidences (soft)
            if self.loss in ("sigmoid", "soft"):
                return self.loss
            return "soft" if self.rule == "posterior" else "sigmoid"
        return "sigmoid" if self.loss == "soft" else (self.loss or "sigmoid")

    def params(self, stages: int) -> dict:
        out = {"rule": self.rule, "stage_loss": self.stage_loss(stages)}
        if self.model_error_confidence is not None:
            out["model_error_confidence"] = self.model_error_confidence
        return out


#: DP-SGD's mechanism, as its engine reports it: logged with every stage and trial.
DPSGD_MECHANISM = ("noise_multiplier", "sample_rate", "steps")


class DPSGDSection(MethodSection):
    method: Literal["dpsgd"]
    loss: Literal["sigmoid", "robust", "soft"] | None = None

    labels: ClassVar[str] = "raw"
    engine: ClassVar[str] = "dpsgd"
    stage_params: ClassVar[tuple[str, ...]] = DPSGD_MECHANISM
    privacy_unit: ClassVar[str] = "pair"

    @model_validator(mode="after")
    def _loss(self):
        if self.loss == "soft":
            raise ValueError("the soft loss needs per-pair confidence, which method 'dpsgd' does not produce")
        if self.loss == "robust":
            raise ValueError("the robust loss corrects for RR flips; method 'dpsgd' trains on unflipped labels")
        return self

    def check_job(self, job) -> str | None:
        if job.model.gradient_checkpointing:
            return ("model.gradient_checkpointing cannot be used with method 'dpsgd' (Opacus's per-pair hooks "
                    "would see each forward twice); set model.gradient_checkpointing: false or run dpsgd in a "
                    "job of its own")
        return None

    def result_params(self, checkpoints: dict[str, dict], job) -> dict:
        final = checkpoints[max(checkpoints, key=int)].get("metrics", {})
        dp = job.privacy.dpsgd
        return {**{k: final.get(k) for k in DPSGD_MECHANISM}, "max_grad_norm": dp.max_grad_norm,
                "delta": final.get("delta"), "accountant": dp.accountant}


class DPRLHFSection(MethodSection):
    """DP-RLHF (arXiv 2310.16960): a reward model on the first ``reward_model_stages`` partitions, then
    PPO on the prompts of the others. ``privacy_model: central`` trains both with DP-SGD at epsilon
    (the paper's (epsilon, delta)-DP per record; the parts are disjoint, so the total is the larger of
    the two); ``label`` trains the reward model on the ledger's RR labels (epsilon-label-DP by
    post-processing) and PPO without noise (prompts are not private under label-DP)."""

    method: Literal["dprlhf"]
    stage_params: ClassVar[tuple[str, ...]] = DPSGD_MECHANISM
    privacy_model: Literal["central", "label"] = "central"
    reward_model_stages: int = Field(1, gt=0, description="the first N stage partitions train the reward model; "
                                                           "the prompts of the rest train PPO")
    ppo_epochs_per_batch: int = Field(1, gt=0, description="PPO epochs over each sampled batch (T_PPO); only 1 "
                                                            "has an accounting rule here")
    beta: float = Field(0.05, gt=0, description="the fixed per-token KL coefficient")
    ppo_lr: float = Field(3e-3, gt=0)
    reward_model_lr: float | None = Field(None, gt=0, description="default train.lr")

    @property
    def labels(self) -> str:  # type: ignore[override]
        return "randomized_response" if self.privacy_model == "label" else "raw"

    @property
    def engine(self) -> str:  # type: ignore[override]
        return "dpsgd" if self.privacy_model == "central" else "standard"

    @property
    def privacy_unit(self) -> str:  # type: ignore[override]
        return "record (a reward-model pair or a PPO prompt)" if self.privacy_model == "central" else "label"

    @field_validator("ppo_epochs_per_batch")
    @classmethod
    def _accounted(cls, v):
        if v != 1:
            raise ValueError("more than 1 has no accounting rule in props-ray: each Poisson-sampled batch is "
                             "used once (T_PPO = 1), which the subsampled-Gaussian analysis covers")
        return v

    def default_name(self) -> str:
        return f"dprlhf-{self.privacy_model}"

    def stage_loss(self, stage: int) -> str:
        return "bradley_terry" if stage == 1 else "ppo"

    def params(self, stages: int) -> dict:
        return {"privacy_model": self.privacy_model, "reward_model_stages": self.reward_model_stages,
                "ppo_beta": self.beta, "ppo_lr": self.ppo_lr, "ppo_epochs_per_batch": self.ppo_epochs_per_batch}

    def check_job(self, job) -> str | None:
        if self.reward_model_stages >= job.stages:
            return (f"methods: dprlhf's reward_model_stages ({self.reward_model_stages}) must be below stages "
                    f"({job.stages}): the partitions after them give PPO its prompts")
        if self.privacy_model == "central" and job.model.gradient_checkpointing:
            return "model.gradient_checkpointing cannot be used with dprlhf's central DP (per-sample hooks)"
        return None

    def result_params(self, checkpoints: dict[str, dict], job) -> dict:
        """Each DP stage's mechanism, so anyone can recompute its epsilon with Opacus's accountant."""
        if self.privacy_model != "central":
            return {}
        out = {"max_grad_norm": job.privacy.dpsgd.max_grad_norm, "accountant": job.privacy.dpsgd.accountant,
               "composition": "parallel over disjoint partitions: epsilon = max over the two stages"}
        for k, part in (("1", "reward_model"), ("2", "ppo")):
            m = checkpoints[k].get("metrics", {})
            out.update({f"{part}_{x}": m.get(x) for x in (*DPSGD_MECHANISM, "delta")})
        return out


class SyntheticInstructionsSection(MethodSection):
    """DP synthetic instructions (arXiv 2402.13659): a generator DP fine-tuned on the private prompts (the
    prompt as the unit) samples synthetic prompts; with ``filter: dp_histogram`` they are resampled to a
    Gaussian-noised histogram of the private prompts' nearest centres (k-means on synthetic prompts only);
    annotators label reference responses to them and DPO trains on those pairs (post-processing). The
    trial's epsilon is the generator and the histogram composed (one accountant)."""

    method: Literal["synthetic_instructions"]
    filter: Literal["dp_histogram", "none"] = "dp_histogram"
    synthetic_per_private: float = Field(4.0, ge=1, description="M / N: synthetic prompts sampled per private one")
    clusters: int = Field(16, ge=2, description="k-means centres fitted on the synthetic prompts")
    histogram_noise: float | None = Field(None, gt=0, description="sigma of the Gaussian noise on each count "
                                                                   "(sensitivity 1); default 10 with dp_histogram")
    explained_variance: float = Field(0.9, gt=0, le=1, description="PCA keeps this share of the synthetic "
                                                                    "embeddings' variance")
    generator_epochs: int = Field(4, gt=0, description="the generator's DP fine-tuning epochs")
    generator_lr: float = Field(0.01, gt=0, description="the generator's learning rate")

    stage_params: ClassVar[tuple[str, ...]] = DPSGD_MECHANISM
    privacy_unit: ClassVar[str] = "prompt"

    @model_validator(mode="after")
    def _noise(self):
        if self.filter == "none" and self.histogram_noise is not None:
            raise ValueError("histogram_noise applies to filter dp_histogram only: filter none releases no "
                             "histogram, so the noise would have nothing to account for")
        return self

    @property
    def histogram_sigma(self) -> float | None:
        return None if self.filter == "none" else (self.histogram_noise or 10.0)

    def default_name(self) -> str:
        return "synthetic-instructions" + ("-unfiltered" if self.filter == "none" else "")

    def stage_loss(self, stage: int) -> str:
        return "language_model" if stage == 1 else "sigmoid"  # the generator, then DPO on synthetic pairs

    def synthetic_count(self, private: int) -> int:
        return int(math.ceil(self.synthetic_per_private * private))

    def check_job(self, job) -> str | None:
        if job.model.gradient_checkpointing:
            return ("model.gradient_checkpointing cannot be used with synthetic_instructions (the generator's "
                    "per-example hooks would see each forward twice)")
        n = job.data.num_pairs
        if n is not None and self.filter == "dp_histogram" and self.clusters > self.synthetic_count(n):
            return (f"methods: synthetic_instructions' clusters ({self.clusters}) is more than the synthetic "
                    f"prompts it samples (synthetic_per_private x data.num_pairs = {self.synthetic_count(n)})")
        return None

    def params(self, stages: int) -> dict:
        return {"filter": self.filter, "synthetic_per_private": self.synthetic_per_private,
                "clusters": self.clusters, "histogram_sigma": self.histogram_sigma,
                "explained_variance": self.explained_variance}

    def result_params(self, checkpoints: dict[str, dict], job) -> dict:
        """The generator's DP-SGD mechanism and the histogram's Gaussian release: with Opacus's accountant,
        history [(sigma, q, steps), (histogram_sigma, 1, 1)] gives the trial's epsilon."""
        m = checkpoints["1"].get("metrics", {})
        return {**{f"generator_{x}": m.get(x) for x in (*DPSGD_MECHANISM, "delta")},
                "max_grad_norm": job.privacy.dpsgd.max_grad_norm, "accountant": job.privacy.dpsgd.accountant,
                "composition": "sequential: the generator's DP-SGD steps then one Gaussian histogram release"}


#: The sections a job's ``methods[i]`` may be, told apart by ``method`` (registration order).
METHOD_SECTIONS = (NonprivateSection, RRSection, PropsSection, DPSGDSection, DPRLHFSection,
                   SyntheticInstructionsSection)


def method_name(section: type[MethodSection]) -> str:
    """The ``method:`` value a section answers to (its ``Literal``)."""
    return section.model_fields["method"].annotation.__args__[0]


def section_of(method: str) -> type[MethodSection]:
    """The section class of the method named ``method``."""
    for s in METHOD_SECTIONS:
        if method_name(s) == method:
            return s
    raise KeyError(f"no method {method!r} is registered")
