"""DP-SGD for DPO inside the Ray Train loop (method ``dpsgd``).

Where each part of the mechanism lives:

- **per-pair gradients and clipping** (:mod:`props_ray.dpsgd.grad_sample`):
  per-layer hooks give per-pair gradient samples of the pair forward, one row
  per pair (the prompt shared) or 2B rows (rows i and B+i summed in the hook);
  :class:`PairDPOptimizer.clip_and_accumulate` clips each pair's whole gradient
  to C once, after every physical batch (so per-sample memory is bounded by
  the physical batch).
- **Poisson sampling** (:mod:`props_ray.dpsgd.sampler`): each worker
  materializes its disjoint shard once per stage and includes each of its pairs
  in each logical step with rate q = B / N_stage; every rank takes the same
  planned number of steps, an empty local batch included.
- **noise** (:class:`PairDPOptimizer.step`): N(0, sigma^2 C^2) per coordinate
  is added on rank 0 only (in secure runs drawn from the OS CSPRNG, like the
  sampling coins; seeded runs use a stream of their own per trial, epsilon,
  stage and epoch), the noisy sum and the other ranks' clipped sums are
  all-reduced (SUM), and the result is divided by the expected global batch
  size B: Opacus's ``DistributedDPOptimizer`` semantics, noise once per logical
  step. No torch DDP: this all-reduce is the only gradient reduction. Initial
  trainable parameters are broadcast from rank 0 (as Opacus's DPDDP does).
- **accounting** (:mod:`props_ray.privacy.accounting`): one accountant per
  disjoint stage, sigma calibrated per stage to the target epsilon for that
  stage's (q, T), epsilon reported = max over stages (parallel composition).
  The accountant state is part of the engine state in every checkpoint.

What the guarantee covers: the model checkpoints (and anything computed from
them). The batches' loss / reward accuracy / margin are computed without noise,
so the loop does not log them for this engine (``logs_batch_statistics``).
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

from props_ray.dpsgd.grad_sample import PairGradSampleModule, RowGradSampleModule, clip_and_sum, per_pair_grad_sample
from props_ray.dpsgd.sampler import PoissonSampler, materialize_shard, physical_batches, sampling_generator, shard_size
from props_ray.privacy.accounting import PrivacyConfigError, StagedAccountant, resolve_delta
from props_ray.privacy.randomness import csprng_normal
from props_ray.train.collectives import all_reduce_flat, broadcast_trainable, rank_and_world


class PairDPOptimizer(DPOptimizer):
    """An Opacus ``DPOptimizer`` whose privacy unit is the preference pair, distributed over ranks.

    - :meth:`clip_and_accumulate` (called once per physical batch) clips each pair's sample to
      ``max_grad_norm`` and adds the clipped sum to ``p.summed_grad``;
    - :meth:`step` (once per logical batch): an empty local batch contributes
      zeros; rank 0 adds the noise; all ranks all-reduce the sum; the result is
      divided by ``expected_batch_size`` (the *global* expected batch size);
      then the wrapped optimizer steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, generator=None, secure_mode: bool = False):
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="sum", generator=generator,
                         secure_mode=secure_mode)
        self.rank, self.world_size = rank_and_world()

    def clip_and_accumulate(self) -> None:
        params = self.params
        for p in params:
            _check_processed_flag(p.grad_sample)
        samples = [per_pair_grad_sample(p) for p in params]
        sums, _ = clip_and_sum(samples, self.max_grad_norm, dtypes=[p.dtype for p in params])
        for p, s in zip(params, sums):
            s = s.view_as(p)
            p.summed_grad = s if p.summed_grad is None else p.summed_grad + s
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """p.grad = local clipped sum (+ the step's noise on rank 0 only)."""
        params = self.params
        sums = []
        for p in params:
            if p.summed_grad is None:  # no pair of this rank in this logical batch
                p.summed_grad = torch.zeros_like(p)
            _check_processed_flag(p.summed_grad)
            sums.append(p.summed_grad.view_as(p))
        if self.rank == 0 and self.noise_multiplier > 0:
            noise = gaussian_noise_like(self.noise_multiplier * self.max_grad_norm, sums, self.generator,
                                        self.secure_mode)
            grads = torch._foreach_add(sums, noise)
        else:
            grads = [g.clone() for g in sums]
        for p, g in zip(params, grads):
            p.grad = g
            _mark_as_processed(p.summed_grad)

    def reduce_gradients(self) -> None:
        all_reduce_flat([p.grad for p in self.params])

    def scale_grad(self) -> None:
        torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size)

    def pre_step(self, closure=None) -> bool:
        self.add_noise()
        self.reduce_gradients()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.pre_step()
        return self.original_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad_sample = None
            p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator | None,
                   secure: bool) -> torch.Tensor:
    """N(0, std^2) per coordinate, shaped like ``reference``: from the OS CSPRNG when ``secure``
    (drawn in float64 on the CPU, then cast and moved), else from the seeded ``generator``."""
    if secure:
        z = torch.from_numpy(csprng_normal(reference.numel())).view(reference.shape)
        return (z * std).to(device=reference.device, dtype=reference.dtype)
    return torch.normal(0.0, std, size=reference.shape, device=reference.device, generator=generator,
                        dtype=reference.dtype)


def gaussian_noise_like(std: float, tensors: list[torch.Tensor], generator: torch.Generator | None,
                        secure: bool) -> list[torch.Tensor]:
    """N(0, std^2) per coordinate of every tensor in ``tensors``, independent across them: one draw of
    their total size when they share a dtype and a device (one kernel, not one a parameter), cut into
    their shapes; a draw per tensor otherwise."""
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return [gaussian_noise(std, t, generator, secure) for t in tensors]
    first = tensors[0]
    flat = gaussian_noise(std, first.new_empty(sum(t.numel() for t in tensors)), generator, secure)
    return [z.view_as(t) for z, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def stream_id(trial: str | None, epsilon: float | None) -> int:
    """A seeded run's stream number for one trial at one epsilon: no two trials share noise or coins."""
    digest = hashlib.sha256(f"{trial}|{epsilon!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        if p.requires_grad:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


class DPSGDEngine:
    """DP-SGD engine for :mod:`props_ray.train.loop` (see the module docstring).

    The loop calls :meth:`start_stage` once per stage before the stage's
    epochs, then :meth:`logical_batches` per epoch.
    """

    name = "dpsgd"
    # The batches' loss, reward accuracy and margin are computed without noise: epsilon does not
    # cover them, so the loop neither logs nor prints them for DP-SGD (epsilon and the
    # mechanism's parameters are logged instead).
    logs_batch_statistics = False

    def __init__(self, *, target_epsilon: float | None, delta: float, max_grad_norm: float,
                 expected_batch_size: int, epochs: int, physical_batch_size: int | None = None,
                 noise_multiplier: float | None = None, accountant: str = "prv", seed: int = 0,
                 secure: bool = False, stream: int = 0, unit: str = "pair", columns: tuple[str, ...] | None = None,
                 compose_with: list[tuple[float, float, int]] | None = None):
        self.target_epsilon = target_epsilon
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.physical_batch_size = physical_batch_size
        self.epochs = int(epochs)
        self.fixed_noise_multiplier = noise_multiplier
        self.compose_with = [tuple(m) for m in compose_with] if compose_with else None
        self.seed = int(seed)
        self.secure = bool(secure)
        self.stream = int(stream)  # seeded runs: one noise and sampling stream per trial and epsilon
        if unit not in ("pair", "row"):
            raise ValueError(f"the DP-SGD unit must be 'pair' (DPO, reward model) or 'row' (PPO), got {unit!r}")
        self.unit = unit  # what one clipped gradient sample is: a preference pair (2 rows), or one row
        self.columns = columns  # the shard's columns to materialize (default: the pair tensors)
        self.accounting = StagedAccountant(delta, accountant)
        self.rank, self.world_size = rank_and_world()
        self.model = None
        self.optimizer: PairDPOptimizer | None = None
        self.stage: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.num_local = 0
        self.empty_local_batches = 0

    @classmethod
    def from_config(cls, cfg, world_size: int, loop_config: dict, **options) -> "DPSGDEngine":
        """From the job's ``privacy.dpsgd``; ``options`` (``unit``, ``columns``) pass through.
        ``compose_with`` in ``loop_config``: mechanisms the stage composes with (calibrated to the sum)."""
        dp = cfg.privacy.dpsgd
        if cfg.model.gradient_checkpointing:
            raise PrivacyConfigError("method 'dpsgd' does not support model.gradient_checkpointing "
                                     "(the per-pair samples would count each recomputed forward twice)")
        total = int(loop_config.get("total_pairs") or loop_config["num_pairs"])
        return cls(target_epsilon=loop_config.get("epsilon"), delta=resolve_delta(dp.delta, total),
                   max_grad_norm=dp.max_grad_norm, expected_batch_size=dp.expected_batch_size or cfg.train.batch_size,
                   epochs=cfg.train.epochs, physical_batch_size=dp.physical_batch_size,
                   noise_multiplier=dp.noise_multiplier, compose_with=loop_config.get("compose_with"),
                   accountant=dp.accountant, seed=cfg.seed,
                   secure=cfg.secure_randomness,
                   stream=stream_id(loop_config.get("trial"), loop_config.get("epsilon")), **options)

    # -- set-up -------------------------------------------------------------------
    def wrap(self, model, optimizer, num_pairs: int | None = None):
        """Broadcast rank 0's trainable parameters, add per-sample hooks, wrap the optimizer (no DDP).
        ``num_pairs`` is unused: each stage is planned in :meth:`start_stage`."""
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise PrivacyConfigError("method 'dpsgd' does not support gradient checkpointing")
        self.rank, self.world_size = rank_and_world()
        broadcast_trainable(model)
        self.model = PairGradSampleModule(model) if self.unit == "pair" else RowGradSampleModule(model)
        self.optimizer = PairDPOptimizer(optimizer, noise_multiplier=0.0, max_grad_norm=self.max_grad_norm,
                                         expected_batch_size=self.expected_batch_size,
                                         secure_mode=self.secure)
        return self.model, self.optimizer

    def start_stage(self, stage: int, shard, device) -> None:
        """Materialize this rank's shard, count the stage's pairs over all ranks, plan and calibrate."""
        self.tensors = materialize_shard(shard) if self.columns is None else materialize_shard(shard, self.columns)
        self.num_local = shard_size(self.tensors)
        count = torch.tensor([self.num_local], dtype=torch.int64, device=device)
        if self.world_size > 1:
            torch.distributed.all_reduce(count)
        num_stage = int(count.item())
        plan = None
        if self.rank == 0:  # calibration is deterministic but costs seconds: do it once, broadcast it
            plan = self.accounting.plan(stage, num_stage, self.expected_batch_size, self.epochs,
                                        self.target_epsilon, self.fixed_noise_multiplier, self.compose_with)
        if self.world_size > 1:
            box = [plan]
            torch.distributed.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            plan = box[0]
            if self.rank != 0:
                old = self.accounting.stages.get(stage)
                self.accounting.stages[stage] = plan if old is None else old
                plan = self.accounting.stages[stage]
        self.enter_stage(stage, plan)

    def enter_stage(self, stage: int, plan) -> None:
        """Train stage ``stage`` under ``plan`` from now on: its accountant and its sigma (set on the
        optimizer here only, so nothing that enters a stage can leave the noise at 0)."""
        self.stage = stage
        self.optimizer.noise_multiplier = plan.noise_multiplier

    # -- per epoch / step ------------------------------------------------------------
    def logical_batches(self, shard, epoch: int, device) -> Iterator[list[dict[str, torch.Tensor]]]:
        if self.stage is None:
            raise RuntimeError("DPSGDEngine.start_stage(stage, shard, device) must be called before logical_batches")
        plan = self.accounting.stages[self.stage]
        sampler = PoissonSampler(self.num_local, plan.sample_rate,
                                 sampling_generator(self.seed, self.stage, epoch, self.rank, self.secure, self.stream))
        if self.rank == 0 and not self.secure:  # secure noise comes from the OS CSPRNG (gaussian_noise)
            gen = torch.Generator(device=device)
            gen.manual_seed(_seed_int(self.seed, self.stream, self.stage, epoch, 0x7015E))
            self.optimizer.generator = gen
        for _ in range(plan.steps_in_epoch(epoch)):
            idx = sampler.sample()
            if idx.numel() == 0:
                self.empty_local_batches += 1
            yield physical_batches(self.tensors, idx, self.physical_batch_size, device)

    def backward(self, per_pair_loss: torch.Tensor) -> None:
        """Back-propagate one physical batch (to the per-sample hooks only: no summed ``p.grad``), then
        clip and accumulate its per-pair gradients."""
        self.model.backward(per_pair_loss.sum())
        self.optimizer.clip_and_accumulate()
        for p in self.optimizer.params:
            p.grad_sample = None

    def step(self, model, optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.accounting.step(self.stage)

    # -- reporting and state -------------------------------------------------------------
    def metrics(self) -> dict:
        """Privacy spent so far, and replica / sampling health.

        Called by every rank at the same points (it runs one collective). Epsilon is computed on
        rank 0 only (a PRV evaluation costs up to a second on a CPU) and shared with the others.
        """
        eps = None
        if self.rank == 0:
            eps = (self.accounting.epsilon(),
                   self.accounting.stage_epsilon(self.stage) if self.stage is not None else 0.0)
        digest = params_digest(self.model) if self.model is not None else ""
        empty = self.empty_local_batches
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, (digest, empty, eps))
            eps = gathered[0][2]
            in_sync = int(len({d for d, _, _ in gathered}) == 1)
            empty = int(sum(e for _, e, _ in gathered))
        else:
            in_sync = 1
        out: dict = {"epsilon": eps[0], "delta": self.accounting.delta}
        if self.target_epsilon is not None:
            out["target_epsilon"] = float(self.target_epsilon)
        if self.stage is not None:
            plan = self.accounting.stages[self.stage]
            out.update({"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                        "steps": plan.steps, "planned_steps": plan.planned_steps, "stage_epsilon": eps[1]})
        out.update({"total_steps": sum(p.steps for p in self.accounting.stages.values()),
                    "max_grad_norm": self.max_grad_norm, "expected_batch_size": self.expected_batch_size,
                    "replicas_in_sync": in_sync, "empty_local_batches": int(empty)})
        return out

    def state_dict(self) -> dict:
        """The per-stage accountants (plans and step histories): a restarted run resumes accounting."""
        return {"accounting": self.accounting.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.accounting.load_state_dict(state.get("accounting", {}))
