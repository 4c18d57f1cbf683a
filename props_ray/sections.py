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

    def result_params(self, final_metrics: dict, job) -> dict:
        """MLflow params known once the trial has trained (e.g. DP-SGD's calibrated noise)."""
        return {}

    def check_job(self, job) -> str | None:
        """Why the job's other settings cannot run this method (a config error naming the field), or None."""
        return None


class NonprivateSection(MethodSection):
    method: Literal["nonprivate"]
    loss: Literal["sigmoid", "robust", "soft"] | None = None

    private: ClassVar[bool] = False  # no epsilon: one trial
    labels: ClassVar[str] = "raw"

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
                          "the combined hard label, soft on its confidence (default: soft for rule posterior, "
                          "sigmoid for mle)")
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

    def result_params(self, final_metrics: dict, job) -> dict:
        dp = job.privacy.dpsgd
        return {**{k: final_metrics.get(k) for k in DPSGD_MECHANISM}, "max_grad_norm": dp.max_grad_norm,
                "delta": final_metrics.get("delta"), "accountant": dp.accountant}


#: The sections a job's ``methods[i]`` may be, told apart by ``method`` (registration order).
METHOD_SECTIONS = (NonprivateSection, RRSection, PropsSection, DPSGDSection)


def section_of(method: str) -> type[MethodSection]:
    """The section class of the method named ``method``."""
    for s in METHOD_SECTIONS:
        if s.model_fields["method"].annotation.__args__ == (method,):
            return s
    raise KeyError(f"no method {method!r} is registered")
