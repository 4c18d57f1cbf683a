"""One renderer for every table props-ray prints: aligned text for a terminal, or Markdown."""

from __future__ import annotations

import math


def render_table(head: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """``rows`` of cells under ``head``: a Markdown table, or columns aligned with two spaces."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]
    return "\n".join(line.rstrip() for line in lines)


def format_epsilon(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def method_label(method: str, rule: str | None) -> str:
    """A trial's label when its run has no ``method_name`` (runs of older versions): ``props-<rule>`` for
    PROPS, else the method itself."""
    if method == "props" and rule:
        return f"props-{rule}"
    return method


def method_sort_key(label: str) -> tuple[int, str]:
    """Registered methods in registration order (the ceiling, label-DP, central DP); a method's variants
    (``props-mle``, ``props-mle-bounded``) right after it, by name; unknown labels last."""
    from props_ray.methods import METHODS

    order = list(METHODS)
    base = max((m for m in order if label == m or label.startswith(m + "-")), key=len, default=None)
    return (order.index(base) if base else len(order), label)
