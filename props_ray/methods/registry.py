"""What a method is to the harness: its config section, its recipe, and what it protects.

A new method is one module in :mod:`props_ray.methods` that defines a :class:`Method` (its section,
a subclass of :class:`~props_ray.sections.MethodSection`, and its recipe), registered in
``props_ray/methods/__init__.py``. The driver, the MLflow run tree, the report and the CLI read
everything else from the section: whether the method has an epsilon, which labels it trains on,
its MLflow params, its stage losses, and the job-level settings it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from props_ray.methods.trial import Trial
    from props_ray.sections import MethodSection


@dataclass(frozen=True)
class Method:
    name: str
    section: type["MethodSection"]
    recipe: Callable[["Trial"], dict]  # trains and evaluates one trial; returns its outcome
    protects: str  # what the guarantee covers, in the README's and the report's words
