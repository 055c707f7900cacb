"""One adapter per architecture family: which Hugging Face / GGUF tensors make each of our text tensors, which model
config keys a checkpoint fixes, and the layout fixes its files need (llama.cpp's rotary row permutation).

torchtitan keeps the same per model (``state_dict_adapter.py``: a name map and the rotary permutation); here the
map runs one way, theirs -> ours, since we never write their formats. Our fused tensors are theirs concatenated along
rows in the order listed: ``attn.wqkv`` = q, k, v (H, G, G heads: the order ``Attention.forward`` splits them in),
``ffn.w13`` = gate, up. Both Hugging Face and our decoder rotate (first half, second half) pairs of each head, so a
Hugging Face tensor is copied as is; llama.cpp rotates adjacent pairs and its converter permutes the Q / K rows of
Llama-family models to match, which ``undo_rope_permutation`` reverses.

Families: ``llama`` (Llama 1/2/3, and every GGUF of architecture ``llama``, Mistral's included), ``mistral`` (the
Llama layout; a sliding window is exact only for rows no longer than it), ``qwen2`` (QKV biases), ``qwen3``
(per-head RMSNorm on q and k, a head dim apart from dim / heads).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class PretrainedError(ValueError):
    """A pretrained checkpoint that cannot be read or mapped onto our decoder; the message is one line naming the
    path, tensor or architecture."""


# our name (per layer, after "layers.{i}.") -> the source tensors concatenated along rows, per format
_HF_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.wqkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.wo.weight": ("self_attn.o_proj.weight",),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
    "ffn.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ffn.w2.weight": ("mlp.down_proj.weight",),
}
_GGUF_LAYER = {
    "attn_norm.weight": ("attn_norm.weight",),
    "attn.wqkv.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "attn.wqkv.bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "attn.wo.weight": ("attn_output.weight",),
    "attn.q_norm.weight": ("attn_q_norm.weight",),
    "attn.k_norm.weight": ("attn_k_norm.weight",),
    "ffn_norm.weight": ("ffn_norm.weight",),
    "ffn.w13.weight": ("ffn_gate.weight", "ffn_up.weight"),
    "ffn.w2.weight": ("ffn_down.weight",),
}
_HF_TOP = {"tok_emb.weight": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",),
           "lm_head.weight": ("lm_head.weight",)}
_GGUF_TOP = {"tok_emb.weight": ("token_embd.weight",), "norm.weight": ("output_norm.weight",),
             "lm_head.weight": ("output.weight",)}
_NAMES = {"hf": ("model.layers.{i}.", _HF_LAYER, _HF_TOP), "gguf": ("blk.{i}.", _GGUF_LAYER, _GGUF_TOP)}
ROPE_KINDS = {"default": "none", "linear": "linear", "llama3": "llama3"}  # Hugging Face rope_type -> ours


def _require(config: dict, key: str, where: str) -> Any:
    if config.get(key) is None:
        raise PretrainedError(f"{where}: config has no '{key}'")
    return config[key]


class FamilyAdapter:
    """The Llama layout, which every family here shares; subclasses switch on biases, QK-norm, sliding windows."""

    family = "llama"
    hf_architectures: tuple[str, ...] = ("LlamaForCausalLM",)
    gguf_architecture: str | None = "llama"
    qkv_bias = False
    qk_norm = False
    gguf_permuted_rope = True  # llama.cpp's converter permuted the Q / K rows (its "normal", interleaved RoPE)

    def source_names(self, fmt: str, model: dict) -> dict[str, tuple[str, ...]]:
        """Our name -> the checkpoint's tensors it is made of, for every text tensor this model has."""
        prefix, layer, top = _NAMES[fmt]
        skip = {"attn.wqkv.bias"} if not model["qkv_bias"] else set()
        skip |= {"attn.q_norm.weight", "attn.k_norm.weight"} if not model["qk_norm"] else set()
        out = {k: v for k, v in top.items() if not (k == "lm_head.weight" and model["tie_embeddings"])}
        for i in range(model["n_layers"]):
            p = prefix.format(i=i)
            out |= {f"layers.{i}.{k}": tuple(p + s for s in v) for k, v in layer.items() if k not in skip}
        return out

    def check_hf(self, config: dict, where: str) -> None:
        """Reject what the Llama layout cannot express, before any tensor is read."""
        if config.get("hidden_act", "silu") != "silu":
            raise PretrainedError(f"{where}: hidden_act '{config['hidden_act']}' is not supported (silu only)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise PretrainedError(f"{where}: attention_bias / mlp_bias are not supported for {self.family}")

    def model_from_hf(self, config: dict, where: str) -> dict:
        """The ModelConfig keys a Hugging Face config.json fixes."""
        self.check_hf(config, where)
        dim, heads = _require(config, "hidden_size", where), _require(config, "num_attention_heads", where)
        theta, scaling = hf_rope(config, where)
        return {"dim": dim, "n_layers": _require(config, "num_hidden_layers", where), "n_heads": heads,
                "n_kv_heads": config.get("num_key_value_heads") or heads,
                "head_dim": config.get("head_dim") or dim // heads,
                "mlp_hidden": _require(config, "intermediate_size", where),
                "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_theta": theta, "rope_scaling": scaling,
                "qk_norm": self.qk_norm, "qkv_bias": self.qkv_bias,
                "tie_embeddings": bool(config.get("tie_word_embeddings", False))}

    def sliding_window(self, config: dict) -> int | None:
        """The attention window the checkpoint was trained with, None when it attends to everything."""
        return None

    def model_from_gguf(self, meta: dict, tensor_names: set[str], where: str) -> dict:
        """The ModelConfig keys a GGUF file's metadata fixes (keys named ``<architecture>.<key>``)."""
        arch = meta["general.architecture"]

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise PretrainedError(f"{where}: GGUF metadata has no '{arch}.{key}'")
            return value

        if "rope_freqs.weight" in tensor_names:
            raise PretrainedError(f"{where}: GGUF rope frequency factors (rope_freqs.weight, Llama 3.1 scaling) are "
                                  f"not supported; load the Hugging Face directory instead")
        dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
        return {"dim": dim, "n_layers": int(get("block_count")), "n_heads": heads,
                "n_kv_heads": int(get("attention.head_count_kv", heads)),
                "head_dim": int(get("attention.key_length", dim // heads)),
                "mlp_hidden": int(get("feed_forward_length")),
                "norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.7g}"),  # stored as float32
                "rope_theta": float(f"{get('rope.freq_base', 10000.0):.7g}"),
                "rope_scaling": gguf_rope(get("rope.scaling.type", "none"), get("rope.scaling.factor", 1.0), where),
                "qk_norm": self.qk_norm, "qkv_bias": self.qkv_bias,
                "tie_embeddings": "output.weight" not in tensor_names}

    def fix_source(self, fmt: str, name: str, value: Tensor, model: dict) -> Tensor:
        """A source tensor in our layout: GGUF Q / K rows of the Llama family back from llama.cpp's permutation."""
        if fmt == "gguf" and self.gguf_permuted_rope and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = model["n_heads"] if name.endswith("attn_q.weight") else model["n_kv_heads"]
            return undo_rope_permutation(value, heads)
        return value


class MistralAdapter(FamilyAdapter):
    family = "mistral"
    hf_architectures = ("MistralForCausalLM",)
    gguf_architecture = None  # llama.cpp writes Mistral models as architecture "llama"

    def sliding_window(self, config: dict) -> int | None:
        return config.get("sliding_window") or None


class Qwen2Adapter(FamilyAdapter):
    family = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_architecture = "qwen2"
    qkv_bias = True
    gguf_permuted_rope = False  # llama.cpp runs Qwen with NeoX (half-split) RoPE: rows as in Hugging Face

    def check_hf(self, config: dict, where: str) -> None:
        if config.get("hidden_act", "silu") != "silu":
            raise PretrainedError(f"{where}: hidden_act '{config['hidden_act']}' is not supported (silu only)")

    def sliding_window(self, config: dict) -> int | None:
        return (config.get("sliding_window") or None) if config.get("use_sliding_window") else None


class Qwen3Adapter(Qwen2Adapter):
    family = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_architecture = "qwen3"
    qkv_bias = False
    qk_norm = True

    def check_hf(self, config: dict, where: str) -> None:
        FamilyAdapter.check_hf(self, config, where)


ADAPTERS: tuple[FamilyAdapter, ...] = (FamilyAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter())


def adapter_for_hf(config: dict, where: str) -> FamilyAdapter:
    """The adapter of a config.json's ``architectures`` entry."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    for adapter in ADAPTERS:
        if archs[0] in adapter.hf_architectures:
            return adapter
    known = ", ".join(a for ad in ADAPTERS for a in ad.hf_architectures)
    raise PretrainedError(f"{where}: unsupported architecture '{archs[0]}' (supported: {known})")


def adapter_for_gguf(arch: str, where: str) -> FamilyAdapter:
    """The adapter of a GGUF ``general.architecture``."""
    for adapter in ADAPTERS:
        if arch == adapter.gguf_architecture:
            return adapter
    known = ", ".join(ad.gguf_architecture for ad in ADAPTERS if ad.gguf_architecture)
    raise PretrainedError(f"{where}: unsupported GGUF architecture '{arch}' (supported: {known})")


def hf_rope(config: dict, where: str) -> tuple[float, dict]:
    """(theta, our rope_scaling dict) from either config style: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older files, ``type`` or ``rope_type``)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise PretrainedError(f"{where}: rope_type '{kind}' is not supported (supported: {', '.join(ROPE_KINDS)})")
    scaling: dict[str, Any] = {"kind": ROPE_KINDS[kind]}
    if kind != "default":
        scaling["factor"] = float(params["factor"])
    if kind == "llama3":
        scaling |= {"low_freq_factor": float(params["low_freq_factor"]),
                    "high_freq_factor": float(params["high_freq_factor"]),
                    "original_max_positions": int(params["original_max_position_embeddings"])}
    return theta, scaling


def gguf_rope(kind: str, factor: float, where: str) -> dict:
    """Our rope_scaling dict from GGUF's ``rope.scaling.type`` / ``factor`` (none or linear)."""
    if kind == "none":
        return {"kind": "none"}
    if kind == "linear":
        return {"kind": "linear", "factor": float(factor)}
    raise PretrainedError(f"{where}: GGUF rope scaling '{kind}' is not supported (supported: none, linear)")


def undo_rope_permutation(w: Tensor, n_heads: int) -> Tensor:
    """Reverse llama.cpp's ``permute``: per head it moved row ``j`` of the first half and row ``j`` of the second
    half next to each other (``reshape(H, 2, Dh/2, D).swapaxes(1, 2)``) so that adjacent rows form a rotary pair;
    our RoPE pairs row j with row j + Dh/2, as Hugging Face does."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise PretrainedError(f"cannot undo the rotary permutation: {rows} rows for {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
