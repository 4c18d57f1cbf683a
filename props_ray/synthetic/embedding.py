"""Embedding and clustering for the DP histogram filter: numpy only, fitted on synthetic prompts only.

- :func:`hash_embed`: a stateless feature-hashing embedding of word unigrams and bigrams (signed,
  L2-normalised). Nothing is fitted, so nothing can learn from real prompts; it needs no model
  download.
- :class:`Projection`: centring and PCA to the components that explain ``variance`` of the
  *synthetic* embeddings (the paper keeps 90%).
- :func:`kmeans`: k-means++ and Lloyd's iterations on the synthetic projections.
- :func:`nearest`: each row's nearest centre: how the real prompts vote, and the synthetic prompts'
  clusters.

The fitted objects see synthetic prompts only: :class:`Filter` takes them in ``fit`` and transforms
real prompts afterwards without updating anything.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=1 << 18)  # prompts repeat their words: a hash per distinct feature
def _bucket(feature: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, 1.0 if (h >> 63) & 1 else -1.0


def hash_embed(texts, dim: int = 512) -> np.ndarray:
    """[n, dim]: signed hashed counts of each text's lower-cased words and word bigrams, L2-normalised."""
    out = np.zeros((len(texts), dim), dtype=np.float64)
    for i, t in enumerate(texts):
        words = str(t).lower().split()
        for f in [*words, *(f"{a} {b}" for a, b in zip(words, words[1:]))]:
            j, sign = _bucket(f, dim)
            out[i, j] += sign
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


@dataclass
class Projection:
    mean: np.ndarray
    components: np.ndarray  # [k, dim]

    @classmethod
    def fit(cls, x: np.ndarray, variance: float = 0.9) -> "Projection":
        """The principal axes from the eigendecomposition of the [dim, dim] scatter matrix: the right
        singular vectors of the centred [n, dim] embeddings (10,000 x 512: 0.09 s against the SVD's 1.1 s)."""
        mean = x.mean(0)
        centred = x - mean
        power, axes = np.linalg.eigh(centred.T @ centred)  # ascending: power = squared singular values
        power, axes = np.clip(power[::-1], 0.0, None), axes[:, ::-1].T
        explained = np.cumsum(power) / max(float(power.sum()), 1e-12)
        k = int(np.searchsorted(explained, variance) + 1)
        return cls(mean, np.ascontiguousarray(axes[:min(k, len(x))]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components.T


def nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x ** 2).sum(1)[:, None] - 2 * x @ centres.T + (centres ** 2).sum(1)[None, :]
    return d.argmin(1)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """[k, d] centres: k-means++ seeding, then Lloyd's iterations until the assignment is stable."""
    if k > len(x):
        raise ValueError(f"{k} clusters need at least {k} points, got {len(x)}")
    centres = [x[rng.integers(len(x))]]
    d = ((x - centres[0]) ** 2).sum(1)  # each point's squared distance to its nearest centre so far
    for _ in range(1, k):
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
        d = np.minimum(d, ((x - centres[-1]) ** 2).sum(1))
    centres = np.array(centres)
    assign = None
    for _ in range(iterations):
        new = nearest(x, centres)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    return centres


@dataclass
class Filter:
    """The embedding, projection and centres of the histogram filter, fitted on synthetic prompts."""

    projection: Projection
    centres: np.ndarray
    dim: int

    @classmethod
    def fit(cls, synthetic: list[str], clusters: int, rng: np.random.Generator, variance: float = 0.9,
            dim: int = 512) -> "Filter":
        x = hash_embed(synthetic, dim)
        projection = Projection.fit(x, variance)
        return cls(projection, kmeans(projection(x), clusters, rng), dim)

    def assign(self, prompts: list[str]) -> np.ndarray:
        """Each prompt's nearest centre (nothing is refitted)."""
        return nearest(self.projection(hash_embed(prompts, self.dim)), self.centres)
