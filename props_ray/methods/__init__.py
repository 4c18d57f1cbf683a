"""The methods of the harness, one recipe module each, registered here.

``props_ray/methods/<name>.py`` holds a method's recipe (a function from a
:class:`~props_ray.methods.trial.Trial` to its outcome, readable top to bottom); its config section
(what ``methods[i]`` of a job may say) is in :mod:`props_ray.sections`. Registering a method is one
line below; the driver, the MLflow run tree, the report and the CLI find it through :data:`METHODS`.
"""

from __future__ import annotations

from props_ray.methods import dpsgd, dprlhf, nonprivate, props, rr, synthetic_instructions
from props_ray.methods.registry import Method
from props_ray.sections import METHOD_SECTIONS

#: In reading order: the ceiling first, then the label-DP methods, then the central-DP ones, then the
#: one that protects the prompts.
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (nonprivate, rr, props, dpsgd, dprlhf,
                                                                  synthetic_instructions)}
assert [m.section for m in METHODS.values()] == list(METHOD_SECTIONS), "a method's section is not registered"


def method(name: str) -> Method:
    return METHODS[name]
