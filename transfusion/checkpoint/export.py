"""Inference export: ``model.safetensors`` + ``config.json`` in one directory, written atomically.

    export/
      model.safetensors   full (unsharded) tensors, dtypes preserved; string metadata (git commit, step, ...)
      config.json         the resolved run config dict the generation engine rebuilds the model from
      tokenizer.json      the run's tokenizer unless it is "bytes" (``carry_tokenizer``); a pretrained checkpoint's
      tokenizer_meta.json   also its special ids and chat template, so serving needs neither the checkpoint nor
                          transformers

The directory is assembled next to its destination and renamed into place, replacing an older export, so a reader
sees either the old export or the new one, never a mix. Exports need full tensors: a sharded training job gathers
them onto rank 0's host memory one parameter at a time (``Trainer.consolidated_state``); offline, load a DCP
checkpoint into an unsharded model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.tensor import DTensor

from transfusion.model.names import upgrade_state_names

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class ExportError(RuntimeError):
    """An export directory that is missing or malformed. The message is one line."""


def _plain_cpu(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors that own their storage (safetensors refuses views and shared storage, e.g. tied
    weights), dtypes untouched."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise ExportError(f"export: '{name}' is a {type(t).__name__}, not a tensor")
        if isinstance(t, DTensor):
            raise ExportError(f"export: '{name}' is a sharded DTensor; export full tensors from a single process")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.nbytes != storage.nbytes():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def export_model(
    out_dir: str | Path, state_dict: dict[str, Tensor], config: dict[str, Any], metadata: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write ``state_dict`` and ``config`` to ``out_dir`` (replacing an existing export). Metadata values are stored
    as strings (non-strings JSON-encoded). ``files`` (name -> source path) are copied in beside them (a tokenizer).
    Returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / WEIGHTS).is_file():
        raise ExportError(f"export: {out_dir} exists and is not an export; refusing to replace it")
    try:
        config_text = json.dumps(config, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise ExportError(f"export: config is not JSON-serialisable ({e})") from None
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = _plain_cpu(state_dict)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        (tmp / CONFIG).write_text(config_text)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def carry_tokenizer(config: dict[str, Any], tokenizer, scratch: str | Path) -> dict[str, Path]:
    """Make an export self-contained: the files ``export_model`` must copy in (name -> source) so the tokenizer
    loads from anywhere, with ``config`` (a ``to_dict`` config, edited in place) pointing at them relative to the
    export. A pretrained checkpoint's tokenizer is saved into ``scratch`` (``tokenizer.json`` + its special ids and
    chat template) and ``model.pretrained`` (and ``pretrained_layers``) cleared: the shape keys are filled and the weights are the export's."""
    from transfusion.tokenizer import SAVED, PretrainedTokenizer

    data = config["data"]
    if isinstance(tokenizer, PretrainedTokenizer):
        saved = tokenizer.save(scratch)
        data["tokenizer"] = SAVED  # resolved against the export directory on load
        config["model"]["pretrained"] = ""
        config["model"]["pretrained_layers"] = 0  # n_layers already holds the layers kept
        return {"tokenizer.json": saved.parent / "tokenizer.json", SAVED: saved}
    if data["tokenizer"] == "bytes":
        return {}
    source, data["tokenizer"] = Path(data["tokenizer"]), "tokenizer.json"
    return {"tokenizer.json": source}


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise ExportError(f"export directory does not exist: {path}")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise ExportError(f"export {path} is missing {name}")


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read an export: ``(state_dict, config)``, the state under today's parameter names (``model/names.py``).
    Raises ExportError with a one-line reason."""
    path = Path(path)
    _check_dir(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"export {path} has an invalid {CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise ExportError(f"export {path}: {CONFIG} must hold a JSON object, got {type(config).__name__}")
    try:
        state_dict = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as e:
        raise ExportError(f"export {path} has an unreadable {WEIGHTS}: {' '.join(str(e).split())}") from None
    return upgrade_state_names(state_dict), config


def export_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in an export's ``model.safetensors`` header (provenance: step, commit, ...)."""
    path = Path(path)
    _check_dir(path)
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ExportError(f"export {path} has an unreadable {WEIGHTS}: {' '.join(str(e).split())}") from None
