"""Where the privacy mechanisms' randomness comes from: pure functions, no Ray, no model.

- :func:`csprng_uniform` and :func:`csprng_normal` read the operating system's CSPRNG
  (``os.urandom``): nothing can replay them, so *secure* runs use them for every RR flip, every
  Poisson-sampling coin and all DP-SGD noise, and write no seed anywhere.
- :func:`keyed_uniform` is a keyed pseudo-random function (HMAC-SHA256) of a record's id: the
  same key and id always give the same value, and a record's value depends on nothing but its
  own id. Stage assignment uses it (adding or removing one pair moves no other pair), and so
  does the derivation of a smaller epsilon from the ledger's draw.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from typing import Iterable

import numpy as np

_TWO_53 = float(1 << 53)


def new_key() -> str:
    """A fresh 256-bit key from the OS CSPRNG, as hex."""
    return secrets.token_hex(32)


def seeded_key(seed: int, purpose: str) -> str:
    """A key derived from a public seed (seeded, reproducible, *not private* runs)."""
    return hashlib.sha256(f"props-ray/{purpose}/{int(seed)}".encode()).hexdigest()


def csprng_uniform(n: int) -> np.ndarray:
    """``n`` uniforms in [0, 1) with 53 random bits each, from ``os.urandom``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) / _TWO_53


def csprng_normal(n: int) -> np.ndarray:
    """``n`` standard normal draws from the OS CSPRNG (Box-Muller on :func:`csprng_uniform`)."""
    m = (n + 1) // 2
    u1 = 1.0 - csprng_uniform(m)  # (0, 1]: log is finite
    u2 = csprng_uniform(m)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
    return z[:n]


def keyed_uniform(key: str, ids: Iterable, *context) -> np.ndarray:
    """One uniform in [0, 1) per id: HMAC-SHA256(key, context | id), 53 bits of it.

    A pure function of (key, context, id): the value of one id never depends on the others.
    """
    k = bytes.fromhex(key) if _is_hex(key) else key.encode()
    prefix = "\x1f".join(str(c) for c in context).encode() + b"\x1e"
    out = []
    for i in ids:
        digest = hmac.new(k, prefix + str(i).encode(), hashlib.sha256).digest()
        out.append((int.from_bytes(digest[:8], "big") >> 11) / _TWO_53)
    return np.asarray(out, dtype=np.float64)


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return len(s) % 2 == 0
    except ValueError:
        return False
