"""Judges that score a (prompt, response): the embedded task's oracle reward, or a reward model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


class OracleJudge:
    """The embedded task's true reward: exact, no model involved."""

    def __init__(self, task):
        self.task = task

    def score(self, generations: pd.DataFrame) -> np.ndarray:
        return self.task.rewards(generations["prompt"], generations["response"])


class RewardModelScorer:
    """map_batches callable: scores prompt+response with an ``AutoModelForSequenceClassification``."""

    def __init__(self, model: str, use_gpu: bool = False, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model).to(self.device).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        texts = [f"{p}{'' if str(r)[:1].isspace() else ' '}{r}" for p, r in zip(batch["prompt"], batch["response"])]
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_length).to(self.device)
        logits = self.model(**enc).logits
        return {"row": batch["row"], "score": logits[:, 0].float().cpu().numpy()}


class RewardModelJudge:
    def __init__(self, model: str, use_gpu: bool = False, num_actors: int = 1):
        self.model, self.use_gpu, self.num_actors = model, use_gpu, num_actors

    def score(self, generations: pd.DataFrame) -> np.ndarray:
        import ray.data

        from props_ray.batch_inference import map_with_model

        out = map_with_model(ray.data.from_pandas(generations[["prompt", "response", "row"]]), RewardModelScorer,
                             {"model": self.model, "use_gpu": self.use_gpu}, batch_size=32,
                             workers=self.num_actors, use_gpu=self.use_gpu).to_pandas()
        scores = dict(zip(out["row"], out["score"]))
        return np.array([scores[r] for r in generations["row"]], dtype=np.float64)
