"""Job configuration: one YAML file per job, validated, with ``--set a.b=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the field. :func:`load_job` is
the single entry point used by the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from props_ray.errors import UserError
from props_ray.embedded.config import SFTConfig, TaskConfig, TinyModelConfig
from props_ray.sections import METHOD_SECTIONS, MethodSection, Section, method_name


class ConfigError(UserError, ValueError):
    """A job file or override that does not validate; the message names the field."""


_Section = Section


class DataConfig(_Section):
    source: str = Field("embedded", description="'embedded', a local JSONL/JSON/Parquet file, or a Hugging Face dataset id")
    format: Literal["auto", "hh_rlhf", "preference", "alpaca_eval"] = "auto"
    split: str = "train"
    num_pairs: int | None = Field(None, gt=0, description="embedded: pairs to generate (default 3000); files: keep the first N valid pairs")
    stage_proportions: list[float] | None = Field(None, description="relative sizes of the K stage partitions (default equal)")
    eval_prompts: int = Field(200, gt=0, description="held-out prompts for the win rate (never trained on)")
    on_bad_row: Literal["error", "skip"] = "error"
    max_prompt_length: int = Field(8, gt=0)
    max_response_length: int = Field(8, gt=0)

    @field_validator("stage_proportions")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(not (p > 0 and math.isfinite(p)) for p in v)):
            raise ValueError("every stage proportion must be a positive number")
        return v


class LoraConfig(_Section):
    enabled: bool = True
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="default: per architecture (GPT-NeoX, GPT-2, Llama)")


class ModelConfig(_Section):
    name: str = Field("embedded", description="'embedded' or a Hugging Face model id / local path")
    tokenizer: str | None = None
    cache_dir: str | None = Field(None, description="reference-model cache (default OUTPUT_DIR/cache)")
    lora: LoraConfig = LoraConfig()
    sft: SFTConfig = SFTConfig()
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False


class TrainConfig(_Section):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    batch_size: int = Field(32, gt=0, description="pairs per optimizer step, over all workers")
    epochs: int = Field(2, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta: float = Field(0.1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="global gradient clipping for non-DP training")
    log_every: int = Field(10, gt=0)
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from (resuming from the last checkpoint)")
    worker_group: Literal["auto", "shared", "per_run"] = "auto"  # props_ray.train.worker_group

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least num_workers ({self.num_workers})")
        return self


class DPSGDConfig(_Section):
    """DP-SGD settings (method 'dpsgd')."""

    delta: float | None = Field(None, gt=0, lt=1, description="default N^-1.1 (strictly below 1/N), N = pairs trained on")
    max_grad_norm: float = Field(1.0, gt=0, description="per-pair clipping norm C")
    noise_multiplier: float | None = Field(None, ge=0, description="fixed sigma instead of calibrating it to epsilon")
    expected_batch_size: int | None = Field(None, gt=0, description="default train.batch_size")
    physical_batch_size: int | None = Field(None, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"


#: A job's ``methods[i]``: the section of the method it names (see :mod:`props_ray.methods`).
MethodConfig = Annotated[Union[METHOD_SECTIONS], Field(discriminator="method")]  # noqa: UP007 - a runtime tuple
_METHOD_ADAPTER = TypeAdapter(MethodConfig)


def parse_method(raw: dict) -> MethodSection:
    return _METHOD_ADAPTER.validate_python(raw)


class PrivacyConfig(_Section):
    epsilons: list[float] = Field(default_factory=lambda: [0.5])
    secure_randomness: bool | None = Field(
        None, description="RR flips, keys, Poisson sampling and DP-SGD noise from the OS CSPRNG, no seed written; "
                          "default: on for real data, seeded (reproducible, not private) for the embedded task")
    acknowledge_seeded_randomness: bool = Field(
        False, description="required with secure_randomness: false on real data: seeded draws can be replayed "
                           "from the seed, so such runs are not private (tagged so in MLflow and the report)")
    accept_new_draw: int | None = Field(
        None, gt=0, description="opt in to the ledger's draw number N: a new RR draw of labels already drawn, "
                                "which adds its epsilon to the dataset's cumulative label-epsilon "
                                "(the refusal that needs it names N)")
    dpsgd: DPSGDConfig = DPSGDConfig()

    @field_validator("epsilons")
    @classmethod
    def _eps(cls, v):
        if not v or any(not (e > 0 and math.isfinite(e)) for e in v):
            raise ValueError("epsilons must be a non-empty list of finite numbers > 0")
        return v


class EvalConfig(_Section):
    max_new_tokens: int | None = Field(None, gt=0, description="default: the task's response length")
    temperature: float = Field(1.0, gt=0)
    samples_per_prompt: int = Field(2, gt=0)
    batch_size: int | None = Field(None, gt=0, description="rows per generation batch; default 256 with the embedded model, else 64")
    judge: str = Field("oracle", description="'oracle' (embedded task) or a reward-model id/path")
    label_accuracy: bool | None = Field(None, description="default: on for the embedded task, off otherwise")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "props-ray"

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class SweepConfig(_Section):
    """A grid over seeds and numbers of stages, on top of methods x epsilons (all in one job run)."""

    seeds: list[int] | None = Field(None, min_length=1, description="default: [seed]")
    stages: list[int] | None = Field(None, min_length=1, description="values of K; default: [stages]")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="trials (method x epsilon) of a variant run at once, each a Ray task launching its "
                                "own trainers; default: as many as the cluster's CPUs hold (1 on a local 2-core "
                                "machine). Applies to any job with several trials, sweep or not")

    @field_validator("stages")
    @classmethod
    def _k(cls, v):
        if v is not None and any(k <= 0 for k in v):
            raise ValueError("every number of stages must be > 0")
        return v


class AuditConfig(_Section):
    """An empirical privacy audit: canary pairs whose label is a secret fair coin are trained on with the
    data; each trial's released model guesses them, and a Clopper--Pearson bound on its accuracy gives a
    lower bound on epsilon, logged beside the claim (:mod:`props_ray.privacy.audit`)."""

    canaries: int = Field(0, ge=0, description="canary pairs inserted into the training data (0: no audit)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="one-sided: the bound holds with confidence 1 - alpha")


#: (section, field) of a job that may name a local file or directory
LOCAL_PATH_FIELDS = (("model", "name"), ("model", "tokenizer"), ("eval", "judge"), ("data", "source"))


class JobConfig(_Section):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output_dir: str = "runs"
    stages: int = Field(3, gt=0, description="K, the number of disjoint partitions / stages")
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    methods: list[MethodConfig] = Field(..., min_length=1)
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="before")
    @classmethod
    def _local_paths(cls, data):
        """A relative path to a local model, judge or data file becomes absolute: Ray workers and trial tasks
        run in other directories, where it would name nothing (and a model would be looked up on the hub)."""
        if not isinstance(data, dict):
            return data
        for section, key in LOCAL_PATH_FIELDS:
            part = data.get(section)
            if isinstance(part, dict) and isinstance(part.get(key), str):
                value = part[key]
                if value not in ("embedded", "oracle") and not os.path.isabs(value) and os.path.exists(value):
                    data = {**data, section: {**part, key: os.path.abspath(value)}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _response_room(cls, data):
        """On the embedded task the responses' token budget defaults to the task's response plus eos."""
        if not isinstance(data, dict):
            return data
        section = data.get("data") or {}
        if not isinstance(section, dict) or section.get("source", "embedded") != "embedded" \
                or "max_response_length" in section:
            return data
        task = data.get("task") or {}
        try:
            task = task if isinstance(task, TaskConfig) else TaskConfig.model_validate(task)
        except ValidationError:
            return data  # the task section's own error is reported by the normal validation
        need = task.response_length + 1
        if need > DataConfig.model_fields["max_response_length"].default:
            data = {**data, "data": {**section, "max_response_length": need}}
        return data

    @model_validator(mode="after")
    def _check(self):
        if (self.is_embedded and self.data.max_response_length < self.task.response_length + 1):
            raise ValueError(f"data.max_response_length {self.data.max_response_length} cannot hold the embedded "
                             f"task's {self.task.response_length}-word responses and eos: set it to at least "
                             f"{self.task.response_length + 1} (or leave it unset)")
        if self.audit.canaries and self.data.source != "embedded":
            raise ValueError("audit.canaries needs data.source 'embedded': the canaries are drawn from its task")
        props = self.data.stage_proportions
        if props is not None and len(props) != self.stages:
            raise ValueError(f"data.stage_proportions has {len(props)} entries but stages is {self.stages}")
        names = [m.display_name for m in self.methods]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"methods: duplicate display names {sorted(dup)}; give each a distinct 'name'")
        if self.data.source != "embedded" and self.eval.judge == "oracle":
            raise ValueError("eval.judge 'oracle' only exists for data.source 'embedded'; "
                             "give a reward-model id or path")
        for m in self.methods:  # what a method refuses of the job's other settings
            problem = m.check_job(self)
            if problem:
                raise ValueError(problem)
        if (self.data.source != "embedded" and self.privacy.secure_randomness is False
                and not self.privacy.acknowledge_seeded_randomness):
            raise ValueError("privacy.secure_randomness: false on real data makes every RR label, stage key and "
                             "DP-SGD noise replayable from the seed: the run is not private. Set "
                             "privacy.acknowledge_seeded_randomness: true to run it anyway (it is tagged "
                             "'not private'), or leave privacy.secure_randomness unset")
        return self

    # -- derived ------------------------------------------------------------
    @property
    def job_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def is_embedded(self) -> bool:
        return self.data.source == "embedded"

    @property
    def secure_randomness(self) -> bool:
        s = self.privacy.secure_randomness
        return (not self.is_embedded) if s is None else s

    @property
    def privacy_status(self) -> str:
        """'private' (secure randomness), 'simulation' (embedded, seeded) or 'not private' (real data, seeded)."""
        if self.secure_randomness:
            return "private"
        return "simulation" if self.is_embedded else "not private"

    @property
    def want_label_accuracy(self) -> bool:
        v = self.eval.label_accuracy
        return self.is_embedded if v is None else v

    def variants(self) -> list["JobConfig"]:
        """One config per (seed, K) of the sweep; a job without a sweep is its own single variant."""
        seeds, ks = self.sweep.seeds or [self.seed], self.sweep.stages or [self.stages]
        if (len(seeds), len(ks)) == (1, 1) and (seeds[0], ks[0]) == (self.seed, self.stages):
            return [self]
        out = []
        for s in seeds:
            for k in ks:
                data = self.data
                if data.stage_proportions is not None and len(data.stage_proportions) != k:
                    data = data.model_copy(update={"stage_proportions": None})
                out.append(self.model_copy(update={"seed": s, "stages": k, "data": data}))
        return out

    @property
    def is_sweep(self) -> bool:
        return len(self.sweep.seeds or [self.seed]) > 1 or len(self.sweep.stages or [self.stages]) > 1

    def trials(self) -> list[tuple[MethodSection, float | None]]:
        """(method, epsilon) pairs to run; epsilon is None for the non-private ceiling."""
        out: list[tuple[MethodSection, float | None]] = []
        for m in self.methods:
            if not m.private:
                out.append((m, None))
            else:
                out.extend((m, float(e)) for e in (m.epsilons or self.privacy.epsilons))
        return out


# -- loading -------------------------------------------------------------------

def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; list items are addressed by index (``methods.0.rule``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, value = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} names no field")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {assignment!r}: '{where}' is not an index of the list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {assignment!r}: field '{where}' is not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {assignment!r}: '{last}' is not an index of the list")
        node[int(last)] = _parse_value(value)
    else:
        node[last] = _parse_value(value)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    methods = {method_name(s) for s in METHOD_SECTIONS}

    for e in err.errors():
        loc = list(e["loc"])
        # methods[i] is a union told apart by 'method': drop the method's name pydantic puts in the path
        loc = [x for i, x in enumerate(loc) if not (i > 0 and isinstance(loc[i - 1], int) and x in methods)]
        msg = e["msg"]
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("method")
            msg = f"must be one of {sorted(methods)}"
        field = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        if e["type"] == "union_tag_invalid" and isinstance(got, dict):
            got = got.get("method")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  field '{field}': {msg}{shown}")
    return "\n".join(lines)


def validate_job(raw: dict, source: str = "<dict>") -> JobConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job config {source}: the top level must be a mapping")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"job file {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job config {p}: the top level must be a mapping")
    for o in overrides or []:
        apply_override(raw, o)
    return validate_job(raw, str(p))


def dump_job(cfg: JobConfig) -> str:
    """The resolved config as YAML (what gets logged as an artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
