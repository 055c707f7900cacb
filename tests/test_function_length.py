"""No library function longer than a screen: 60 lines from ``def`` to its last line, docstring included (the house
rule for transfusion/ and data_pipelines/), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def long_functions(repo: Path = REPO, max_lines: int = MAX_LINES) -> list[tuple[str, int]]:
    """``("path:line name", lines)`` for every function or method over ``max_lines`` lines."""
    out = []
    for root in ("transfusion", "data_pipelines"):
        for path in sorted((repo / root).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > max_lines:
                        out.append((f"{rel}:{node.lineno} {node.name}", n))
    return out


def test_no_function_over_sixty_lines():
    assert not long_functions(), long_functions()


def test_the_check_finds_a_long_function(tmp_path):
    """The counter itself: of a 61-line method and a 60-line function (def line to last line, a decorator not
    counted), only the first is found, in either package."""
    body = "    x = 1\n" * 58 + "    return x\n"
    (tmp_path / "transfusion" / "serving").mkdir(parents=True)
    (tmp_path / "data_pipelines").mkdir()
    (tmp_path / "data_pipelines" / "a.py").write_text(
        'class C:\n    @staticmethod\n    def long():\n        """doc"""\n' + body.replace("    ", "        ")
        + "\n\n@staticmethod\ndef fits():\n" + body)
    (tmp_path / "transfusion" / "serving" / "b.py").write_text('async def also_long():\n    """doc"""\n' + body)
    assert long_functions(tmp_path) == [("transfusion/serving/b.py:1 also_long", 61),
                                        ("data_pipelines/a.py:3 long", 61)]
