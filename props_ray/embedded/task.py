"""The embedded preference task: a controlled task whose true reward the package knows.

A prompt names a *topic* (plus a few context words that make prompts varied);
a response is a fixed number of content words. The hidden true reward of a
response to a prompt is the mean of a per-topic word score:

    r(prompt, response) = (1/L) * sum_t W[topic(prompt), word_t],

where W mixes a score every topic shares with a topic-specific one
(``topic_weight``), so part of what is preferred depends on the prompt. With
``interaction_weight`` lambda > 0 adjacent words interact through a shared score B:

    r = [ (1/L) sum_t W[topic, w_t] + lambda (1/(L-1)) sum_t B[w_t, w_{t+1}] ] / sqrt(1 + lambda^2),

so the best response is a path, not a bag of words (it is still exact: ``best_reward`` finds it by
dynamic programming). Two presets (``PRESETS``): ``standard`` (8 topics, 32 content words, 6-word
responses, no interaction), which a few thousand pairs nearly solve, and ``hard`` (24 topics, 64
words, 10-word responses, lambda = 1), whose non-private ceiling needs most of 30k pairs.

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

#: every topic word a task can use; a task takes the first ``topics`` of them
ALL_TOPICS = ("garden", "ocean", "city", "forest", "desert", "kitchen", "river", "mountain",
              "island", "village", "harbor", "meadow", "castle", "library", "market", "valley",
              "glacier", "canyon", "station", "temple", "orchard", "prairie", "lagoon", "volcano")
#: the standard preset's topics
TOPICS = ALL_TOPICS[:8]
CONTEXT_WORDS = ("please", "tell", "me", "about", "the", "a", "today", "briefly", "story",
                 "some", "words", "on", "now", "again", "kindly", "describe")
CONTENT_WORDS = (
    "red", "blue", "green", "gold", "silver", "bright", "dark", "calm", "wild", "soft",
    "loud", "quiet", "warm", "cold", "fresh", "old", "young", "tall", "small", "deep",
    "sweet", "bitter", "fast", "slow", "clear", "misty", "stone", "glass", "wood", "salt",
    "sun", "rain",
    "iron", "silk", "copper", "amber", "ivory", "crimson", "velvet", "hollow", "gentle", "fierce",
    "bold", "faint", "sharp", "smooth", "rough", "heavy", "light", "thin", "wide", "narrow",
    "early", "late", "rich", "plain", "ancient", "modern", "humble", "proud", "swift", "still",
    "golden", "pale",
)
#: the standard preset's content words
STANDARD_CONTENT_WORDS = 32
#: named settings of the task; fields given beside a preset override it
PRESETS = {
    "standard": {},
    "hard": {"topics": 24, "content_words": 64, "response_length": 10, "interaction_weight": 1.0},
}
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
    topics: int = len(TOPICS)
    content_words: int = STANDARD_CONTENT_WORDS
    interaction_weight: float = 0.0

    def __post_init__(self):
        if self.prompt_mix not in PROMPT_MIXES:
            raise ValueError(f"prompt_mix must be one of {PROMPT_MIXES}, got {self.prompt_mix!r}")
        if not 2 <= self.topics <= len(ALL_TOPICS):
            raise ValueError(f"topics must be between 2 and {len(ALL_TOPICS)}, got {self.topics}")
        if not 2 <= self.content_words <= len(CONTENT_WORDS):
            raise ValueError(f"content_words must be between 2 and {len(CONTENT_WORDS)}, got {self.content_words}")

    @classmethod
    def preset(cls, name: str, **fields) -> "EmbeddedTask":
        return cls(**{**PRESETS[name], **fields})

    # -- vocabulary -------------------------------------------------------
    @property
    def topic_names(self) -> tuple[str, ...]:
        return ALL_TOPICS[: self.topics]

    @property
    def content_names(self) -> tuple[str, ...]:
        return CONTENT_WORDS[: self.content_words]

    @property
    def vocabulary(self) -> list[str]:
        return [*SPECIAL_TOKENS, *self.topic_names, *CONTEXT_WORDS, PROMPT_END, *self.content_names]

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
        shared = rng.standard_normal(self.content_words)  # what every topic likes (e.g. helpfulness)
        specific = rng.standard_normal((self.topics, self.content_words))
        return (shared[None, :] + self.topic_weight * specific) / np.sqrt(1.0 + self.topic_weight ** 2)

    @cached_property
    def pair_scores(self) -> np.ndarray:
        """B[word, next word], the hidden score of adjacent content words (used when interaction_weight > 0)."""
        return np.random.default_rng([self.seed, 0xB16]).standard_normal((self.content_words, self.content_words))

    @cached_property
    def _word_index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.content_names)}

    @cached_property
    def _topic_index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.topic_names)}

    def topic_of(self, prompt: str) -> int:
        for tok in prompt.split():
            if tok in self._topic_index:
                return self._topic_index[tok]
        raise ValueError(f"prompt {prompt!r} names no topic of the embedded task")

    def _score(self, topic: int, words: np.ndarray) -> float:
        """The reward of content-word indices ``words`` (-1 where a slot holds no content word)."""
        L, lam = self.response_length, self.interaction_weight
        ok = words >= 0
        unigram = self.word_scores[topic, words[ok]].sum() / L
        if lam == 0:
            return float(unigram)
        both = ok[:-1] & ok[1:]
        pairs = self.pair_scores[words[:-1][both], words[1:][both]].sum() / max(L - 1, 1)
        return float((unigram + lam * pairs) / np.sqrt(1.0 + lam ** 2))

    def reward(self, prompt: str, response: str) -> float:
        """The true reward; words outside the content vocabulary score 0 (and break a pair),
        and a response is always scored over ``response_length`` slots."""
        idx = self._word_index
        words = np.array([idx.get(w, -1) for w in response.split()[: self.response_length]], dtype=np.int64)
        return self._score(self.topic_of(prompt), words)

    def rewards(self, prompts, responses) -> np.ndarray:
        return np.array([self.reward(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)

    def best_reward(self, topic: int) -> float:
        """The highest reward any response to a prompt on ``topic`` can get (exact, by dynamic programming
        over the response's slots)."""
        L, lam = self.response_length, self.interaction_weight
        scale = np.sqrt(1.0 + lam ** 2)
        unary = self.word_scores[topic] / L / scale
        if lam == 0 or L == 1:
            return float(L * unary.max())
        pair = lam * self.pair_scores / max(L - 1, 1) / scale
        best = unary.copy()  # best score of a prefix ending in each word
        for _ in range(L - 1):
            best = (best[:, None] + pair).max(axis=0) + unary
        return float(best.max())

    # -- sampling ------------------------------------------------------------
    @property
    def topic_shares(self) -> np.ndarray:
        """The prompt mixture's share of each topic."""
        if self.prompt_mix == "uniform":
            return np.full(self.topics, 1.0 / self.topics)
        w = (np.arange(self.topics) + 1.0) ** -SKEW_EXPONENT
        return w / w.sum()

    def intent_words(self, topic: int) -> list[int]:
        """The skewed mixture's four context words of ``topic``: disjoint across topics 0-3; later topics
        reuse those of topics 0-3 (topic t those of t mod 4), so a rare topic's prompts resemble a common one's."""
        return [(4 * topic + j) % len(CONTEXT_WORDS) for j in range(4)]

    def sample_prompts(self, n: int, rng: np.random.Generator, mix: str | None = None) -> list[str]:
        mix = mix or self.prompt_mix
        if mix == "uniform":
            topics = rng.integers(0, self.topics, size=n)
            ctx = rng.integers(0, len(CONTEXT_WORDS), size=(n, self.context_length))
        else:
            topics = rng.choice(self.topics, size=n, p=self.topic_shares)
            intent = np.array([self.intent_words(t) for t in range(self.topics)])[topics]  # [n, 4]
            own = rng.random((n, self.context_length)) < INTENT_PROBABILITY
            ctx = np.where(own, np.take_along_axis(intent, rng.integers(0, 4, size=(n, self.context_length)), 1),
                           rng.integers(0, len(CONTEXT_WORDS), size=(n, self.context_length)))
        names = self.topic_names
        return [" ".join([*(CONTEXT_WORDS[j] for j in c), names[t], PROMPT_END]) for t, c in zip(topics, ctx)]

    def topic_mixture(self, prompts) -> np.ndarray:
        """The share of each topic among ``prompts``; a prompt that names no topic counts in none."""
        counts = np.zeros(self.topics)
        for p in prompts:
            t = self.parse_topic(p)
            if t is not None:
                counts[t] += 1
        return counts / max(counts.sum(), 1.0)

    def parse_topic(self, prompt: str) -> int | None:
        """The topic of a well-formed prompt (context words, one topic, the prompt end), else None."""
        words = prompt.split()
        if (len(words) != self.context_length + 2 or words[-1] != PROMPT_END or words[-2] not in self._topic_index
                or any(w not in CONTEXT_WORDS for w in words[:-2])):
            return None
        return self._topic_index[words[-2]]

    def sample_responses(self, n: int, rng: np.random.Generator) -> list[str]:
        words = rng.integers(0, self.content_words, size=(n, self.response_length))
        names = self.content_names
        return [" ".join(names[j] for j in row) for row in words]

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
