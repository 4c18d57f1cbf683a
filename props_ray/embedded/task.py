"""The embedded preference task: a controlled task whose true reward the package knows.

A prompt names a *topic* (plus a few context words that make prompts varied);
a response is a fixed number of content words. The hidden true reward of a
response to a prompt is the mean of a per-topic word score:

    r(prompt, response) = (1/L) * sum_t W[topic(prompt), word_t],

where W mixes a score every topic shares with a topic-specific one
(``topic_weight``), so part of what is preferred depends on the prompt.

Prompts follow one of two mixtures (``prompt_mix``): ``uniform`` (every topic and context word
equally likely) or ``skewed``, a private prompt distribution worth matching: topic shares fall off as
a power law (46% for the commonest topic, 3% for the rarest) and each topic has its own *intent*, four
context words it uses most of the time, so prompts form separate clusters. The reward depends on the
topic only, so the oracle stays exact under either mixture. The reference's warm-up always sees the
uniform mixture: it is the public prior, not the private distribution.

Human labels are simulated with a Bradley--Terry model,
P(a preferred over b) = sigmoid((r_a - r_b) / temperature), so the task has a
known ground truth for label accuracy and an exact judge (the oracle reward)
for win rates. Responses in the preference data are drawn uniformly at random,
which is also what the reference (SFT) model is warmed up to generate; DPO
moves the policy towards each topic's high-scoring words, so alignment is
visible in the win rate against the reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import pandas as pd

TOPICS = ("garden", "ocean", "city", "forest", "desert", "kitchen", "river", "mountain")
CONTEXT_WORDS = ("please", "tell", "me", "about", "the", "a", "today", "briefly", "story",
                 "some", "words", "on", "now", "again", "kindly", "describe")
CONTENT_WORDS = (
    "red", "blue", "green", "gold", "silver", "bright", "dark", "calm", "wild", "soft",
    "loud", "quiet", "warm", "cold", "fresh", "old", "young", "tall", "small", "deep",
    "sweet", "bitter", "fast", "slow", "clear", "misty", "stone", "glass", "wood", "salt",
    "sun", "rain",
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
PROMPT_END = "answer:"
PROMPT_MIXES = ("uniform", "skewed")
#: skewed mixture: topic k's share is proportional to (k + 1) ** -SKEW_EXPONENT
SKEW_EXPONENT = 1.3
#: skewed mixture: how often a context word comes from the topic's own intent words
INTENT_PROBABILITY = 0.85


@dataclass(frozen=True)
class EmbeddedTask:
    """Parameters of the controlled task; ``seed`` fixes the hidden reward."""

    seed: int = 1234
    response_length: int = 6
    context_length: int = 3
    label_temperature: float = 0.1
    topic_weight: float = 0.5
    prompt_mix: str = "uniform"

    def __post_init__(self):
        if self.prompt_mix not in PROMPT_MIXES:
            raise ValueError(f"prompt_mix must be one of {PROMPT_MIXES}, got {self.prompt_mix!r}")

    # -- vocabulary -------------------------------------------------------
    @property
    def vocabulary(self) -> list[str]:
        return [*SPECIAL_TOKENS, *TOPICS, *CONTEXT_WORDS, PROMPT_END, *CONTENT_WORDS]

    def fingerprint(self) -> str:
        """A short hash of the task definition, used to key caches."""
        fields = asdict(self)
        fields.pop("prompt_mix")  # the reward, vocabulary and warm-up do not depend on it
        blob = json.dumps({**fields, "vocab": self.vocabulary}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    # -- hidden reward -----------------------------------------------------
    @cached_property
    def word_scores(self) -> np.ndarray:
        """W[topic, content word], the hidden per-topic word scores."""
        rng = np.random.default_rng(self.seed)
        shared = rng.standard_normal(len(CONTENT_WORDS))  # what every topic likes (e.g. helpfulness)
        specific = rng.standard_normal((len(TOPICS), len(CONTENT_WORDS)))
        return (shared[None, :] + self.topic_weight * specific) / np.sqrt(1.0 + self.topic_weight ** 2)

    @cached_property
    def _word_index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(CONTENT_WORDS)}

    def topic_of(self, prompt: str) -> int:
        for tok in prompt.split():
            if tok in TOPICS:
                return TOPICS.index(tok)
        raise ValueError(f"prompt {prompt!r} names no topic of the embedded task")

    def reward(self, prompt: str, response: str) -> float:
        """The true reward; words outside the content vocabulary score 0,
        and a response is always scored over ``response_length`` slots."""
        t = self.topic_of(prompt)
        idx = self._word_index
        words = response.split()[: self.response_length]
        total = sum(self.word_scores[t, idx[w]] for w in words if w in idx)
        return float(total / self.response_length)

    def rewards(self, prompts, responses) -> np.ndarray:
        return np.array([self.reward(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)

    # -- sampling ------------------------------------------------------------
    @property
    def topic_shares(self) -> np.ndarray:
        """The prompt mixture's share of each topic."""
        if self.prompt_mix == "uniform":
            return np.full(len(TOPICS), 1.0 / len(TOPICS))
        w = (np.arange(len(TOPICS)) + 1.0) ** -SKEW_EXPONENT
        return w / w.sum()

    def intent_words(self, topic: int) -> list[int]:
        """The skewed mixture's four context words of ``topic``: disjoint across topics 0-3; topics 4-7
        reuse those of topics 0-3, so a rare topic's prompts resemble a common one's."""
        return [(4 * topic + j) % len(CONTEXT_WORDS) for j in range(4)]

    def sample_prompts(self, n: int, rng: np.random.Generator, mix: str | None = None) -> list[str]:
        mix = mix or self.prompt_mix
        if mix == "uniform":
            topics = rng.integers(0, len(TOPICS), size=n)
            ctx = rng.integers(0, len(CONTEXT_WORDS), size=(n, self.context_length))
        else:
            topics = rng.choice(len(TOPICS), size=n, p=self.topic_shares)
            intent = np.array([self.intent_words(t) for t in range(len(TOPICS))])[topics]  # [n, 4]
            own = rng.random((n, self.context_length)) < INTENT_PROBABILITY
            ctx = np.where(own, np.take_along_axis(intent, rng.integers(0, 4, size=(n, self.context_length)), 1),
                           rng.integers(0, len(CONTEXT_WORDS), size=(n, self.context_length)))
        return [" ".join([*(CONTEXT_WORDS[j] for j in c), TOPICS[t], PROMPT_END]) for t, c in zip(topics, ctx)]

    def topic_mixture(self, prompts) -> np.ndarray:
        """The share of each topic among ``prompts``; a prompt that names no topic counts in none."""
        counts = np.zeros(len(TOPICS))
        for p in prompts:
            t = self.parse_topic(p)
            if t is not None:
                counts[t] += 1
        return counts / max(counts.sum(), 1.0)

    def parse_topic(self, prompt: str) -> int | None:
        """The topic of a well-formed prompt (context words, one topic, the prompt end), else None."""
        words = prompt.split()
        if (len(words) != self.context_length + 2 or words[-1] != PROMPT_END or words[-2] not in TOPICS
                or any(w not in CONTEXT_WORDS for w in words[:-2])):
            return None
        return TOPICS.index(words[-2])

    def sample_responses(self, n: int, rng: np.random.Generator) -> list[str]:
        words = rng.integers(0, len(CONTENT_WORDS), size=(n, self.response_length))
        return [" ".join(CONTENT_WORDS[j] for j in row) for row in words]

    def preference_pairs(self, n: int, seed: int) -> pd.DataFrame:
        """``n`` pairs with simulated human labels, as {id, prompt, chosen, rejected}.

        The label is drawn from the Bradley--Terry model on the true reward, so
        some labels disagree with the reward (as human labels do).
        """
        rng = np.random.default_rng([seed, 0xDA7A])
        prompts = self.sample_prompts(n, rng)
        a = self.sample_responses(n, rng)
        b = self.sample_responses(n, rng)
        for i in range(n):  # resample the rare identical pair
            while a[i] == b[i]:
                b[i] = self.sample_responses(1, rng)[0]
        a_wins = self.simulate_preferences(prompts, a, b, rng)
        return pd.DataFrame({
            "id": [f"embedded-{seed}-{i:06d}" for i in range(n)],
            "prompt": prompts,
            "chosen": np.where(a_wins, a, b),
            "rejected": np.where(a_wins, b, a),
        })

    def canary_pairs(self, n: int, seed: int, avoid: set[str]) -> pd.DataFrame:
        """``n`` audit canaries {id, prompt, chosen, rejected}: distinct prompts that no pair in ``avoid``
        has, two random responses, and which one is "chosen" a fair coin, independent of the reward."""
        rng = np.random.default_rng([seed, 0xCA7A])
        prompts: list[str] = []
        seen = set(avoid)
        for _ in range(1000 * max(n, 1)):
            if len(prompts) == n:
                break
            p = self.sample_prompts(1, rng, mix="uniform")[0]
            if p not in seen:
                seen.add(p)
                prompts.append(p)
        if len(prompts) < n:
            raise ValueError(f"the task has too few distinct prompts left for {n} canaries")
        a, b = self.sample_responses(n, rng), self.sample_responses(n, rng)
        for i in range(n):
            while a[i] == b[i]:
                b[i] = self.sample_responses(1, rng)[0]
        coin = rng.random(n) < 0.5
        return pd.DataFrame({"id": [f"canary-{i:06d}" for i in range(n)], "prompt": prompts,
                             "chosen": np.where(coin, a, b), "rejected": np.where(coin, b, a)})

    def simulate_preferences(self, prompts, a, b, rng: np.random.Generator) -> np.ndarray:
        """The simulated human labeller: True where response ``a`` is preferred, drawn from the
        Bradley--Terry model on the true reward."""
        ra, rb = self.rewards(prompts, a), self.rewards(prompts, b)
        p_a = 1.0 / (1.0 + np.exp(-(ra - rb) / self.label_temperature))
        return rng.random(len(p_a)) < p_a

    def eval_prompts(self, n: int, seed: int) -> list[str]:
        """Held-out evaluation prompts (a separate random stream from the pairs)."""
        return self.sample_prompts(n, np.random.default_rng([seed, 0xE7A1]))

    def sft_examples(self, n: int, seed: int) -> tuple[list[str], list[str]]:
        """Prompt/response pairs for the reference model's warm-up: uniform responses."""
        rng = np.random.default_rng([seed, 0x5F7])
        return self.sample_prompts(n, rng, mix="uniform"), self.sample_responses(n, rng)
