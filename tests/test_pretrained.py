"""Pretrained checkpoints: our decoder's logits equal Hugging Face's for every supported family (fp32), for one
document and for a packed row of three; GGUF files (llama.cpp's rotary permutation undone, quantised tensors
de-quantised) give the same; bad input is one line; under torchrun + FSDP2 the sharded load gives the 1-process loss.

transformers is the reference here only (tests); the loader never imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import smollm2_gguf
from transfusion.attention.backends import build_attention_mask
from transfusion.config import ConfigError, load_config
from transfusion.model import build_model
from transfusion.pretrained.adapters import hf_rope
from transfusion.pretrained.checkpoint import PretrainedError, load_pretrained, open_checkpoint
from transfusion.pretrained.config import open_pretrained

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
EXTRA_ROWS = 3  # the new ids (image markers) the tokenizer adds after the checkpoint's rows
VOCAB = 96
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.1, rms_norm_eps=1e-6)
FAMILIES = {  # name -> (transformers config class, model class, extra config keys)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rope_theta=500000.0)),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=4096)),
}


def save_hf(path: Path, family: str, seed: int = 0, **save_kw) -> Path:
    """A tiny random model of ``family`` saved with save_pretrained; every weight (norms and biases too) perturbed
    away from its init so a mis-mapped tensor shows in the logits."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**SIZES, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **save_kw)
    return path


def recipe(path: Path, *extra: str):
    return load_config(None, [f"--model.pretrained={path}", "--data.tokenizer=pretrained", "--model.attention=sdpa",
                              *extra])


def ours(path: Path):
    """Our model with the checkpoint's weights (vocab = its rows + a few new ones), in eval mode."""
    cfg = recipe(path)
    ckpt = open_pretrained(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, ckpt.vocab_rows + EXTRA_ROWS, 3)
    load_pretrained(model, ckpt)
    return model.eval(), ckpt


@torch.no_grad()
def our_logits(model, docs: list[list[int]]) -> torch.Tensor:
    """Text-only logits of one packed row holding ``docs``: positions restart per document, document-causal mask."""
    tokens = torch.tensor([sum(docs, [])])
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    mask = build_attention_mask(doc_ids, torch.full_like(doc_ids, -1), "sdpa")
    h, _ = model.trunk(model.embed(tokens), positions, mask)
    return model.text_logits(h)[0]


@torch.no_grad()
def hf_logits(path: Path, docs: list[list[int]], **kw) -> list[torch.Tensor]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return [ref(torch.tensor([d])).logits[0] for d in docs]


DOCS = [[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 14, 50], [7, 7, 90, 1, 26], [64, 12, 45, 30, 8, 19, 77, 3, 55]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_hugging_face(tmp_path, family):
    path = save_hf(tmp_path / family, family)
    model, ckpt = ours(path)
    assert ckpt.family == FAMILIES[family][1].removesuffix("ForCausalLM").lower() and ckpt.vocab_rows == VOCAB
    refs = hf_logits(path, DOCS)
    single = our_logits(model, DOCS[:1])[:, :VOCAB]
    assert (single - refs[0]).abs().max() <= 1e-4
    packed = our_logits(model, DOCS)[:, :VOCAB]  # one row, three documents, each against its own HF forward
    ends = np.cumsum([0] + [len(d) for d in DOCS])
    for i, ref in enumerate(refs):
        assert (packed[ends[i]:ends[i + 1]] - ref).abs().max() <= 1e-4, f"document {i}"


def test_first_layers_only_equal_a_truncated_hugging_face_model(tmp_path):
    """model.pretrained_layers = 1 keeps the checkpoint's first layer (and its final norm and head): the logits are
    those of the Hugging Face model loaded with num_hidden_layers = 1, which drops the same later layers."""
    path = save_hf(tmp_path / "llama", "llama_gqa")
    cfg = recipe(path, "--model.pretrained_layers=1")
    ckpt = open_pretrained(cfg)
    assert cfg.model.n_layers == 1 and ckpt.model["n_layers"] == 2
    assert open_pretrained(cfg).model["n_layers"] == 2 and cfg.model.n_layers == 1  # resolving again: unchanged
    model = build_model(cfg.model, ckpt.vocab_rows + EXTRA_ROWS, 3)
    load_pretrained(model, ckpt)
    ref = hf_logits(path, DOCS[:1], num_hidden_layers=1)[0]
    assert (our_logits(model.eval(), DOCS[:1])[:, :VOCAB] - ref).abs().max() <= 1e-4
    full = hf_logits(path, DOCS[:1])[0]
    assert (full - ref).abs().max() > 1e-2  # the second layer matters: the test would see it kept
    with pytest.raises(ConfigError, match="pretrained_layers = 3 exceeds"):
        open_pretrained(recipe(path, "--model.pretrained_layers=3"))
    with pytest.raises(ConfigError, match="pretrained_layers needs model.pretrained"):
        open_pretrained(load_config(None, ["--model.pretrained_layers=1"]))


def test_checkpoint_fixes_the_model_config(tmp_path):
    cfg = recipe(save_hf(tmp_path / "q3", "qwen3"))
    open_pretrained(cfg)
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_hidden) == (32, 2, 4, 2, 16, 48)
    assert m.qk_norm and not m.qkv_bias and not m.tie_embeddings and m.norm_eps == 1e-6
    cfg = recipe(save_hf(tmp_path / "l3", "llama3_rope"))
    open_pretrained(cfg)
    assert not cfg.model.qk_norm and cfg.model.rope_scaling.kind == "llama3"
    assert cfg.model.rope_scaling.original_max_positions == 64 and cfg.model.rope_scaling.factor == 8.0
    open_pretrained(cfg)  # idempotent: the filled config resolves again


def test_sharded_directory_loads_lazily(tmp_path):
    whole = save_hf(tmp_path / "whole", "llama_gqa")
    sharded = save_hf(tmp_path / "sharded", "llama_gqa", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a, b = open_checkpoint(whole), open_checkpoint(sharded)
    for (na, ta), (nb, tb) in zip(a.tensors(), b.tensors(), strict=True):
        assert na == nb and torch.equal(ta, tb)
    model, _ = ours(sharded)
    assert (our_logits(model, DOCS[:1])[:, :VOCAB] - hf_logits(whole, DOCS[:1])[0]).abs().max() <= 1e-4


def test_new_vocabulary_rows_keep_their_init(tmp_path):
    path = save_hf(tmp_path / "m", "llama")
    cfg = recipe(path)
    ckpt = open_pretrained(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, ckpt.vocab_rows + EXTRA_ROWS, 3)
    before = model.tok_emb.weight.detach().clone()
    load_pretrained(model, ckpt)
    assert torch.equal(model.tok_emb.weight[VOCAB:], before[VOCAB:])
    assert not torch.equal(model.tok_emb.weight[:VOCAB], before[:VOCAB])


def test_mot_twins_start_as_copies_of_the_loaded_text_weights(tmp_path):
    """load_pretrained ends with copy_text_to_image_twins: with model.mot the image twins hold the checkpoint's
    weights, and text-only logits are those of the plain model."""
    path = save_hf(tmp_path / "m", "qwen2")
    cfg = recipe(path, "--model.mot=true")
    ckpt = open_pretrained(cfg)
    torch.manual_seed(0)  # as ``ours``: the new vocabulary rows get the same init
    model = build_model(cfg.model, ckpt.vocab_rows + EXTRA_ROWS, 3)
    load_pretrained(model, ckpt)
    for block in model.layers:
        assert torch.equal(block.image_attn.wqkv.weight, block.attn.wqkv.weight)
        assert torch.equal(block.image_attn.wqkv.bias, block.attn.wqkv.bias)
        assert torch.equal(block.image_ffn.w2.weight, block.ffn.w2.weight)
    plain, _ = ours(path)
    assert torch.equal(our_logits(model.eval(), DOCS[:1]), our_logits(plain, DOCS[:1]))


def test_old_style_rope_config():
    assert hf_rope({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}, "x") == (
        1e6, {"kind": "linear", "factor": 2.0})
    assert hf_rope({}, "x") == (10000.0, {"kind": "none"})
    with pytest.raises(PretrainedError, match="rope_type 'yarn' is not supported"):
        hf_rope({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x")


# -- GGUF ----------------------------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to Q / K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf_dir: Path, arch: str = "llama") -> Path:
    """An F32 GGUF with the tensors of a tiny HF Llama, named and permuted as llama.cpp's converter writes them."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(128)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, value in sd.items():
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            out = f"blk.{i}.{names[module]}.{kind}"
            if module == "self_attn.q_proj":
                value = llama_cpp_permute(value, config["num_attention_heads"])
            if module == "self_attn.k_proj":
                value = llama_cpp_permute(value, config["num_key_value_heads"])
        w.add_tensor(out, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied"])
def test_gguf_undoes_the_rotary_permutation(tmp_path, family):
    hf_dir = save_hf(tmp_path / "hf", family)
    path = write_gguf(tmp_path / "tiny.gguf", hf_dir)
    g, h = open_checkpoint(path), open_checkpoint(hf_dir)
    assert g.format == "gguf" and g.model == h.model and g.vocab_rows == h.vocab_rows
    for (ng, tg), (nh, th) in zip(g.tensors(), h.tensors(), strict=True):
        assert ng == nh and torch.equal(tg, th), ng
    model, _ = ours(path)
    assert (our_logits(model, DOCS[:1])[:, :VOCAB] - hf_logits(hf_dir, DOCS[:1])[0]).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def smollm2():
    """(our model, HF's, tokenizer) from the real SmolLM2 GGUF: both de-quantise Q4_1 / Q8_0 to fp32 (~20 s)."""
    path = smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model, ckpt = ours(path)
    return model, ref.eval(), tok, ckpt


def test_smollm2_gguf_logits_equal_hugging_face(smollm2):
    model, ref, tok, ckpt = smollm2
    assert ckpt.family == "llama" and ckpt.model["tie_embeddings"] and ckpt.model["n_kv_heads"] == 3
    sentences = ["The capital of France is", "def fibonacci(n):", "A red circle on the left of a blue square."]
    docs = [tok(s)["input_ids"] for s in sentences]
    with torch.no_grad():
        refs = [ref(torch.tensor([d])).logits[0] for d in docs]
    packed = our_logits(model, docs)[:, :ckpt.vocab_rows]  # measured: 0.0 alone, ~5e-5 packed (logits up to ~36)
    ends = np.cumsum([0] + [len(d) for d in docs])
    for i, r in enumerate(refs):
        assert (our_logits(model, docs[i:i + 1])[:, :ckpt.vocab_rows] - r).abs().max() <= 1e-4, sentences[i]
        got = packed[ends[i]:ends[i + 1]]
        assert (got - r).abs().max() <= 1e-4, sentences[i]
        assert torch.equal(got.argmax(-1), r.argmax(-1))


# -- bad input: one line each ---------------------------------------------------------------------------------------
def test_directory_without_config_json(tmp_path):
    with pytest.raises(PretrainedError, match="has no config.json") as e:
        open_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_unsupported_architectures(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(PretrainedError, match="unsupported architecture 'GPT2LMHeadModel'") as e:
        open_checkpoint(tmp_path / "gpt2")
    assert "\n" not in str(e.value)
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PretrainedError, match="unsupported GGUF architecture 'gpt2'") as e:
        open_checkpoint(tmp_path / "gpt2.gguf")
    assert "\n" not in str(e.value)


def test_missing_tensor_and_bad_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_hf(tmp_path / "m", "llama")
    sd = load_file(path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, path / "model.safetensors")
    model, ckpt = build_model(recipe_model(path), VOCAB, 3), open_checkpoint(path)
    with pytest.raises(PretrainedError, match="tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_pretrained(model, ckpt)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(PretrainedError, match="'model.norm.weight' has dtype torch.int32"):
        load_pretrained(model, open_checkpoint(path))


def recipe_model(path: Path):
    cfg = recipe(path)
    open_pretrained(cfg)
    return cfg.model


def test_recipe_contradicting_the_checkpoint(tmp_path):
    path = save_hf(tmp_path / "m", "llama")
    with pytest.raises(ConfigError) as e:
        open_pretrained(recipe(path, "--model.dim=64"))
    assert str(e.value).startswith("model.dim = 64 in the recipe contradicts the checkpoint's 32")
    assert "\n" not in str(e.value)
    cfg = recipe(path, "--model.n_layers=2", "--model.qk_norm=false")  # agreeing keys are fine
    open_pretrained(cfg)
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, [f"--model.pretrained={path}"])
    mistral = save_hf(tmp_path / "mistral", "mistral")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(config | {"sliding_window": 100}))
    open_pretrained(recipe(mistral, "--data.seq_len=96"))  # rows no longer than the window: exact
    with pytest.raises(ConfigError, match="seq_len 192 exceeds the checkpoint's sliding_window 100"):
        open_pretrained(recipe(mistral))


@pytest.mark.parametrize("case", ["contradiction", "no_config", "architecture"])
def test_train_cli_fails_in_one_line(tmp_path, case):
    path = save_hf(tmp_path / "m", "llama")
    extra = ["--model.dim=64"] if case == "contradiction" else []
    if case == "no_config":
        (path / "config.json").unlink()
    if case == "architecture":
        (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml", f"--run.dir={run_dir}",
           f"--model.pretrained={path}", "--data.tokenizer=pretrained", "--run.device=cpu", "--no-progress",
           "--model.n_layers=2", "--model.n_heads=4", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not run_dir.exists()


# -- sharded start (torchrun, FSDP2, 2 CPU ranks) -------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_sharded_load_gives_the_one_process_loss(tmp_path):
    """Every rank reads each tensor and keeps its shard; the first-step loss equals one process's."""
    path = save_hf(tmp_path / "m", "llama_tied")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    worker = str(REPO / "tests" / "pretrained_fsdp_worker.py")
    outs = {n: tmp_path / f"out{n}" for n in (1, 2)}
    for n, out in outs.items():
        out.mkdir()
        launch = [sys.executable, worker] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker]
        proc = subprocess.run([*launch, str(path), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((outs[1] / "rank_0.json").read_text())
    ranks = [json.loads((outs[2] / f"rank_{r}.json").read_text()) for r in (0, 1)]
    for rec in ranks:
        assert rec["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    for name in one["local"]:  # each rank holds its shard of every text tensor, the two shards make the whole
        assert sum(r["local"][name] for r in ranks) == one["full"][name], name
        assert all(r["local"][name] < one["full"][name] for r in ranks), name
