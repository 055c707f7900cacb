"""Read a pretrained language model from local files and copy it into our decoder, one tensor at a time.

    ckpt = open_checkpoint("models/SmolLM2-135M")        # or "model.Q4_1.gguf"; reads config / metadata only
    ckpt.model        # {"dim": 576, "n_layers": 30, ...}: the ModelConfig keys it fixes (config.resolve_model_config)
    load_pretrained(model, ckpt)                          # every text tensor, fp32, rows past vocab_rows untouched

Formats: a Hugging Face directory (config.json + model.safetensors, or model.safetensors.index.json and its shards;
read lazily with safetensors' memory-mapped ``safe_open``) or a ``.gguf`` file (read with ``gguf.GGUFReader``,
quantised tensors de-quantised to fp32 with ``gguf.quants.dequantize``). The name map and layout fixes live in one
adapter per architecture family (``adapters.py``). Nothing here touches the network.

Tensors are read one at a time, so host memory peaks at one full tensor, never the whole checkpoint: under torchrun
with FSDP2 every rank reads each tensor and keeps only its own shard of it (``load_pretrained``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from transfusion.pretrained.adapters import FamilyAdapter, PretrainedError, adapter_for_gguf, adapter_for_hf

__all__ = ["PretrainedCheckpoint", "PretrainedError", "load_pretrained", "open_checkpoint"]
ROW_TENSORS = ("tok_emb.weight", "lm_head.weight")  # one row per vocabulary id: ours may have more rows (new ids)


@dataclass
class PretrainedCheckpoint:
    """A checkpoint opened for reading: what it fixes of the model, and its tensors under our names."""

    path: Path
    format: str  # "hf" | "gguf"
    family: str  # "llama" | "qwen2" | "qwen3" | "mistral"
    model: dict  # the ModelConfig keys it fixes (rope_scaling as a dict of RopeScalingConfig keys)
    vocab_rows: int  # rows of its embedding matrix (may exceed its tokenizer's size: Qwen pads them)
    adapter: FamilyAdapter = field(repr=False)
    read: Callable[[str], Tensor] = field(repr=False)  # a source tensor by its own name, fp32
    sliding_window: int | None = None  # the attention window it was trained with (None: full attention)

    def names(self) -> list[str]:
        """Our names of every text tensor it provides."""
        return list(self.adapter.source_names(self.format, self.model))

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """(our name, fp32 tensor) pairs, read lazily one at a time, in ``names`` order (default: every one)."""
        sources = self.adapter.source_names(self.format, self.model)
        for name in sources if names is None else names:
            if name not in sources:
                raise PretrainedError(f"{self.path}: no tensor maps to '{name}' for a {self.family} checkpoint")
            parts = [self.adapter.fix_source(self.format, s, self.read(s), self.model) for s in sources[name]]
            yield name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def open_checkpoint(path: str | Path) -> PretrainedCheckpoint:
    """A Hugging Face model directory or a ``.gguf`` file, opened lazily (config and metadata only)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _open_hf(p)
    if p.is_file() and p.suffix == ".gguf":
        return _open_gguf(p)
    if p.exists():
        raise PretrainedError(f"pretrained checkpoint {p} is neither a Hugging Face model directory nor a .gguf file")
    raise PretrainedError(f"pretrained checkpoint not found: {p}")


# -- Hugging Face directories ----------------------------------------------------------------------------------
def _open_hf(p: Path) -> PretrainedCheckpoint:
    if not (p / "config.json").is_file():
        raise PretrainedError(f"{p} has no config.json (expected a Hugging Face model directory or a .gguf file)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{p / 'config.json'} is not readable JSON: {e}") from None
    adapter = adapter_for_hf(config, str(p))
    reader = SafetensorsReader(p)
    model = adapter.model_from_hf(config, str(p))
    vocab_rows = reader.shape("model.embed_tokens.weight")[0]
    return PretrainedCheckpoint(p, "hf", adapter.family, model, vocab_rows, adapter, reader.read,
                                adapter.sliding_window(config))


class SafetensorsReader:
    """Tensors of a directory's model.safetensors or of the shards model.safetensors.index.json lists, by name."""

    def __init__(self, p: Path) -> None:
        self.path = p
        if (p / "model.safetensors.index.json").is_file():
            index = json.loads((p / "model.safetensors.index.json").read_text())
            self.files = {name: p / f for name, f in index["weight_map"].items()}
        elif (p / "model.safetensors").is_file():
            self.files = {name: p / "model.safetensors" for name in self._open(p / "model.safetensors").keys()}
        else:
            raise PretrainedError(f"{p} has no model.safetensors or model.safetensors.index.json")
        self.handles: dict[Path, object] = {}

    def _open(self, f: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # a truncated file, an unknown dtype: safetensors raises its own error types
            raise PretrainedError(f"{f} is not a readable safetensors file: {str(e).splitlines()[0]}") from None

    def _handle(self, name: str):
        if name not in self.files:
            raise PretrainedError(f"{self.path}: tensor '{name}' is missing")
        f = self.files[name]
        if f not in self.handles:
            self.handles[f] = self._open(f)
        return self.handles[f]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> Tensor:
        try:
            value = self._handle(name).get_tensor(name)
        except PretrainedError:
            raise
        except Exception as e:
            raise PretrainedError(f"{self.path}: tensor '{name}' is not readable: {str(e).splitlines()[0]}") from None
        if not value.is_floating_point():
            raise PretrainedError(f"{self.path}: tensor '{name}' has dtype {value.dtype}, not a float type")
        return value.float()


# -- GGUF files ------------------------------------------------------------------------------------------------
def _open_gguf(p: Path) -> PretrainedCheckpoint:
    try:
        import gguf
    except ImportError:
        raise PretrainedError(f"reading {p} needs the gguf package (pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # a truncated file or bad magic
        raise PretrainedError(f"{p} is not a readable GGUF file: {str(e).splitlines()[0]}") from None
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    if "general.architecture" not in meta:
        raise PretrainedError(f"{p}: GGUF metadata has no general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    adapter = adapter_for_gguf(meta["general.architecture"], str(p))
    model = adapter.model_from_gguf(meta, set(tensors), str(p))
    if "token_embd.weight" not in tensors:
        raise PretrainedError(f"{p}: tensor 'token_embd.weight' is missing")
    vocab_rows = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dims innermost first

    def read(name: str) -> Tensor:
        if name not in tensors:
            raise PretrainedError(f"{p}: tensor '{name}' is missing")
        return _dequantize(tensors[name], p)

    return PretrainedCheckpoint(p, "gguf", adapter.family, model, vocab_rows, adapter, read)


def _field_value(f) -> object:
    """A scalar or string metadata value (arrays are left out: only the tokenizer has them)."""
    try:
        return f.contents()
    except Exception:  # older gguf releases: no contents(); scalars sit in the last part
        return f.parts[f.data[0]].tolist()[0] if f.data else None


def _dequantize(t, p: Path) -> Tensor:
    """One GGUF tensor as fp32 in numpy / torch order (outermost dim first)."""
    from gguf.quants import dequantize

    try:
        values = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise PretrainedError(f"{p}: tensor '{t.name}' has quant type {t.tensor_type.name}, which cannot be "
                              f"de-quantised ({e})") from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return torch.from_numpy(values.reshape(shape).astype("float32", copy=True))


# -- loading into a model ----------------------------------------------------------------------------------------
@torch.no_grad()
def load_pretrained(model: nn.Module, ckpt: PretrainedCheckpoint) -> None:
    """Copy every text tensor of ``ckpt`` into ``model`` (built from the resolved config, materialised, possibly
    FSDP2-sharded); embedding / output rows past ``ckpt.vocab_rows`` keep their init, as do the image modules. Each
    tensor is read, copied (each rank keeping its shard) and dropped before the next is read. With ``model.mot`` the
    image twins are then copied from the loaded text weights (shard to shard)."""
    from transfusion.distributed.parallelize import clean_name
    from transfusion.model.layers import copy_text_to_image_twins

    params = {clean_name(n): t for n, t in model.named_parameters()}  # a tied lm_head is listed once, as tok_emb
    depth = len(model.layers)  # model.pretrained_layers: the checkpoint's first `depth` layers only
    names = [n for n in ckpt.names() if not (n.startswith("layers.") and int(n.split(".")[1]) >= depth)]
    absent = [n for n in names if n not in params]
    if absent:
        raise PretrainedError(f"{ckpt.path}: the model has no parameter '{absent[0]}' (build it from the config "
                              f"resolve_model_config fills)")
    for name, value in ckpt.tensors(names):
        _copy_into(params[name], value, name, ckpt.path)
    copy_text_to_image_twins(model)  # model.mot: the image twins start as copies of the loaded text weights


def _copy_into(param: Tensor, value: Tensor, name: str, path: Path) -> None:
    """Write a full-size checkpoint tensor into ``param`` (a plain tensor, or a DTensor whose local shard is kept)."""
    from torch.distributed.tensor import DTensor

    from transfusion.distributed.init import assign_full

    shape = tuple(param.shape)  # a DTensor's shape is global
    fits = value.shape == shape or (name in ROW_TENSORS and value.shape[1:] == shape[1:] and value.shape[0] <= shape[0])
    if not fits:
        raise PretrainedError(f"{path}: tensor for '{name}' has shape {tuple(value.shape)}, the model's is {shape}")
    value = value.to(param.dtype)
    if value.shape != shape:  # new vocabulary rows: keep the model's init for them
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach().clone()
        full[: value.shape[0]] = value.to(full.device)
        value = full
    assign_full(param, value)
