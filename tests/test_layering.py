"""Dependencies run one way: the contract (batch, sequence format, tokenizer, config) at the bottom, data_pipelines
on the contract only, the model side free of data_pipelines, and no import cycle between packages.

Imports are read from the source (every ``import`` statement, function-level ones included), so a lazy import inside
a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTRACT = {"transfusion.batch", "transfusion.sequence", "transfusion.tokenizer", "transfusion.config"}
MODEL_SIDE = ("model", "attention", "diffusion", "latents", "generation", "checkpoint")


def unit(module: str) -> str | None:
    """The package (or top-level module) a module belongs to: ``transfusion.model.layers`` -> ``transfusion.model``."""
    parts = module.split(".")
    if parts[0] == "data_pipelines":
        return "data_pipelines"
    if parts[0] != "transfusion":
        return None
    return "transfusion" if len(parts) == 1 else f"transfusion.{parts[1]}"


def imports() -> dict[str, set[tuple[str, str]]]:
    """Per source file: the (imported module, source unit) pairs of every absolute import of our packages."""
    out: dict[str, set[tuple[str, str]]] = {}
    for root in ("transfusion", "data_pipelines"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found |= {(n, unit(module)) for n in names if unit(n) is not None}
            out[str(rel)] = found
    return out


def test_model_side_never_imports_data_pipelines():
    bad = [(f, m) for f, found in imports().items() for m, _ in found
           if f.startswith(tuple(f"transfusion/{p}/" for p in MODEL_SIDE)) and unit(m) == "data_pipelines"]
    assert not bad, bad


def test_data_pipelines_imports_only_the_contract():
    bad = [(f, m) for f, found in imports().items() for m, _ in found
           if f.startswith("data_pipelines/") and unit(m) != "data_pipelines" and m not in CONTRACT]
    assert not bad, bad


def test_contract_modules_import_only_the_contract():
    bad = [(f, m) for f, found in imports().items() for m, _ in found
           if f.removesuffix(".py").replace("/", ".") in CONTRACT and m not in CONTRACT]
    assert not bad, bad


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for found in imports().values():
        for module, src in found:
            if unit(module) != src:
                graph[src].add(unit(module))
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert "transfusion.model" in graph and "data_pipelines" in graph  # the walk saw the packages


def test_image_head_choice_lives_in_the_head_modules():
    """One image-head interface: no ``is_mar`` anywhere, and ``model.head`` compared only where the config is checked;
    the head is built (``transfusion/model/heads.py``) and its sampling job chosen
    (``transfusion/generation/image_sampling.py``) by registries keyed by ``model.head``."""
    allowed = {"transfusion/config.py"}
    hits = []
    for root in ("transfusion", "data_pipelines", "tools"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            text = path.read_text()
            if "is_mar" in text or (rel not in allowed and ('head == "mar"' in text or "head == 'mar'" in text)):
                hits.append(rel)
    assert not hits, hits


def imported_names(node: ast.AST, package: str) -> list[str]:
    """The absolute names an import statement binds from: ``import a.b`` -> ``a.b``; ``from a import b`` ->
    ``a.b`` (a module or a name in ``a``); relative imports resolved against ``package``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" for a in node.names]


def module_imports(root: str = "transfusion") -> dict[str, set[str]]:
    """Per module of ``root`` (``transfusion.model.mar``): the modules of ``root`` it imports anywhere in its source
    (top-level or inside a function), resolved to files: ``from transfusion.model import mar`` is an import of
    ``transfusion.model.mar``, ``from transfusion.model.mar import X`` one of ``transfusion.model.mar``."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in sorted((REPO / root).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            for name in imported_names(node, package):
                target = name if name in files else name.rpartition(".")[0]  # ``from m import X``: m
                if target in files and target != module:
                    found.add(target)
        graph[module] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_modules():
    """No cycle among the modules of ``transfusion`` at all, lazy (function-level) imports included: a lazy import
    only hides a cycle from the interpreter, not from a reader."""
    graph = module_imports()
    assert "transfusion.model.mar" in graph and graph["transfusion.model.transfusion"]  # the walk saw the modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_never_references_the_engine():
    """The model does not know who samples from it: no file under ``transfusion/model/`` names the engine (the word,
    in code, comments or docstrings) or imports ``transfusion.generation`` / ``transfusion.serving``. Sampling lives
    in generation and takes the model as an argument."""
    outside = ("transfusion.generation", "transfusion.serving")
    hits = []
    for path in sorted((REPO / "transfusion/model").rglob("*.py")):
        rel, text = str(path.relative_to(REPO)), path.read_text()
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        hits += [f"{rel}: the word {m.group(0)!r}" for m in re.finditer(r"\bengines?\b", text, re.IGNORECASE)]
        hits += [f"{rel}: imports {n}" for node in ast.walk(ast.parse(text))
                 for n in imported_names(node, module.rpartition(".")[0]) if n.startswith(outside)]
        hits += [f"{rel}: names {o}" for o in outside if o in text]
    assert not hits, hits
