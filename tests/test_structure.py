"""The shape of the package: no import circles, privacy math without Ray, modules of a readable size,
and one registry that every method's section and recipe go through."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "props_ray"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, modules) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("props_ray"):
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            if node.module in modules:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the check works


@pytest.mark.parametrize("module", ["randomized_response", "label_combination", "accounting", "randomness"])
def test_privacy_math_imports_no_ray_and_no_model(module):
    text = (PACKAGE / "privacy" / f"{module}.py").read_text()
    tree = ast.parse(text)
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"ray", "torch", "transformers", "peft", "mlflow"}, names


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_every_method_is_registered_with_its_section():
    from props_ray.config import parse_method, validate_job
    from props_ray.methods import METHODS
    from props_ray.sections import METHOD_SECTIONS

    assert [m.section for m in METHODS.values()] == list(METHOD_SECTIONS)
    for name, method in METHODS.items():
        assert callable(method.recipe) and method.protects
        section = parse_method({"method": name})
        assert type(section) is method.section and section.method == name
    cfg = validate_job({"name": "j", "methods": [{"method": n} for n in METHODS]})
    assert [m.method for m, _ in cfg.trials()] == list(METHODS)
