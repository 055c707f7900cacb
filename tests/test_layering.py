"""Dependencies run one way: the contract (batch, sequence format, tokenizer, config) at the bottom, data_pipelines
on the contract only, the model side free of data_pipelines, and no import cycle between packages.

Imports are read from the source (every ``import`` statement, function-level ones included), so a lazy import inside
a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
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
    """One image-head interface: no ``is_mar`` anywhere, and ``model.head`` compared only where the head is built
    (``build_image_head``) and where the config is checked."""
    allowed = {"transfusion/model/image_head.py", "transfusion/config.py"}
    hits = []
    for root in ("transfusion", "data_pipelines", "tools"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            text = path.read_text()
            if "is_mar" in text or (rel not in allowed and ('head == "mar"' in text or "head == 'mar'" in text)):
                hits.append(rel)
    assert not hits, hits
