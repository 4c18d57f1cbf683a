"""The embedded default's sections of a job: ``task`` (the task's parameters, a preset filling those not
given), and ``model.sft`` and ``model.tiny`` (the reference's warm-up and size)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from props_ray.embedded.task import PRESETS
from props_ray.sections import Section


class TaskConfig(Section):
    """The embedded preference task (used when data.source is 'embedded'). A preset fills the fields
    that are not given (:data:`props_ray.embedded.task.PRESETS`)."""

    preset: Literal["standard", "hard"] = Field(
        "standard", description="standard: 8 topics, 32 words, 6-word responses; hard: 24 topics, 64 words, "
                                "10-word responses whose adjacent words interact")
    seed: int = 1234
    response_length: int = Field(6, gt=0)
    label_temperature: float = Field(0.1, gt=0)
    topic_weight: float = Field(0.5, ge=0, description="how much of the hidden reward depends on the prompt's topic")
    prompt_mix: Literal["uniform", "skewed"] = Field(
        "uniform", description="the prompts' distribution: uniform, or skewed (power-law topic shares, a rare "
                               "topic under 3%, each topic with its own intent words)")
    topics: int = Field(8, ge=2, le=24)
    content_words: int = Field(32, ge=2, le=64)
    interaction_weight: float = Field(0.0, ge=0, description="how much of the reward comes from adjacent word pairs")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if isinstance(data, dict) and data.get("preset", "standard") in PRESETS:
            return {**PRESETS[data.get("preset", "standard")], **data}
        return data


class SFTConfig(Section):
    """Warm-up of the embedded reference model."""

    steps: int = Field(300, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    examples: int = Field(4096, gt=0)


class TinyModelConfig(Section):
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
