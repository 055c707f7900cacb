"""tools/import_llm.py: an imported checkpoint continues text as its Hugging Face original does (KV-cached greedy
decoding equals ``generate(do_sample=False)``, ``Engine.text_logits`` equals its logits) for tiny random Llama / Qwen2
/ Qwen3 directories and the real SmolLM2 GGUF; bad input is one line and writes nothing; the server answers a chat
in the checkpoint's own template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import smollm2_gguf
from transfusion.generation.engine import Engine
from transfusion.tokenizer import SAVED

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes/shapes3_tiny.toml")  # pixels: no VAE to build first
TEXTS = ["the sky is blue and the grass is green", "def f(x):\n    return x + 1", "héllo wörld"]
FAMILIES = {  # name -> (transformers config class, model class, extra config keys)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
}
CHAT = [{"role": "user", "content": "What color is the sky on a clear day?"}]


def import_llm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools/import_llm.py"), *argv], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny(path: Path, family: str) -> Path:
    """A random model of ``family`` with a tokenizer, both written by save_pretrained; weights perturbed so a
    mis-mapped tensor shows. The embedding has 5 rows more than the tokenizer (as Qwen's has)."""
    hf_tok = tiny_tokenizer()
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=len(hf_tok) + 5, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        rms_norm_eps=1e-6, bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def greedy_equal(eng: Engine, ref, ids: list[int], n: int = 20) -> list[int]:
    """Our KV-cached greedy continuation (``decode_text`` at temperature 0) against ``generate``; ids our decoding
    never samples (the checkpoint's BOS / PAD when it has them) are suppressed there too."""
    ours = eng.decode_text(eng.prefill([ids]), n, temperature=0.0)[0]
    rows = ref.get_input_embeddings().weight.shape[0]
    banned = [i for i in eng.text_banned_ids() if i < rows and i != eng.tok.eos_id]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=eng.tok.eos_id,
                           pad_token_id=eng.tok.eos_id, suppress_tokens=banned or None)[0, len(ids):].tolist()
    theirs = out[:out.index(eng.tok.eos_id)] if eng.tok.eos_id in out else out
    assert ours == theirs
    return ours


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_continues_like_hugging_face(tmp_path, family):
    src = save_tiny(tmp_path / "hf", family)
    r = import_llm(str(src), "--out", str(tmp_path / "export"), "--recipe", RECIPE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "export")
    assert "freshly initialised" in r.stderr
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["model"]["pretrained"] == "" and config["model"]["dim"] == 32 and config["model"]["n_layers"] == 2
    assert config["data"]["tokenizer"] == SAVED
    eng = Engine.from_export(str(tmp_path / "export"), precision="fp32")
    ref = getattr(transformers, FAMILIES[family][1]).from_pretrained(src, dtype=torch.float32).eval()
    rows = ref.get_input_embeddings().weight.shape[0]
    tok = eng.tok  # the checkpoint's BOS / EOS; no PAD in it, so PAD is new like BOI / EOI / IMAGE
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # "<s>", "</s>": the trainer's first two tokens
    assert sorted([tok.pad_id, tok.boi_id, tok.eoi_id, tok.image_id]) == list(range(rows, rows + 4))
    assert tok.vocab_size == rows + 4
    ids = [tok.encode(t) for t in TEXTS[:2]]
    ids = [row[:min(map(len, ids))] for row in ids]
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits
    assert (eng.text_logits(torch.tensor(ids))[..., :rows] - theirs).abs().max() <= 1e-4
    lengths = [len(greedy_equal(eng, ref, tok.encode(text))) for text in TEXTS]
    assert max(lengths) >= 10, lengths  # continuations long enough to show a cache error


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "export"
    cases = [
        [str(tmp_path / "missing"), "--out", str(out), "--recipe", RECIPE],
        [str(tmp_path), "--out", str(out), "--recipe", RECIPE],  # a directory with no config.json
        [str(save_tiny(tmp_path / "hf", "llama")), "--out", str(out), "--recipe", str(tmp_path / "nope.toml")],
        [str(tmp_path / "hf"), "--out", str(out), "--recipe", RECIPE, "--set", "model.dim=48"],  # contradicts
    ]
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    cases.append([str(tmp_path / "fake.gguf"), "--out", str(out), "--recipe", RECIPE])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases.append([str(tmp_path / "hf"), "--out", str(tmp_path / "taken"), "--recipe", RECIPE])
    for argv in cases:
        r = import_llm(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr)
        assert not out.exists()
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert import_llm("--help").returncode == 0


# -- the real SmolLM2-135M-Instruct (Q4_1 GGUF) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "export"
    r = import_llm(str(smollm2_gguf()), "--out", str(out), "--recipe", RECIPE)
    assert r.returncode == 0, r.stderr
    return out


def test_smollm2_chat_greedy_equals_hugging_face(smollm2_export):
    path = smollm2_gguf()
    eng = Engine.from_export(str(smollm2_export), precision="fp32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = eng.tok.encode_chat(CHAT)
    assert ids == list(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"])
    answer = eng.tok.decode(greedy_equal(eng, ref, ids))
    assert "blue" in answer


def test_smollm2_served_chat_answers_in_english(smollm2_export):
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
    from fastapi.testclient import TestClient

    from transfusion.serving.server import create_app

    eng = Engine.from_export(str(smollm2_export), precision="fp32")
    with TestClient(create_app(eng, model_name="smollm2")) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 24, "temperature": 0,
                                                      "max_images": 0, "seed": 0})
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert "blue" in answer.lower(), answer


def test_exports_carry_their_tokenizer(tmp_path):
    """carry_tokenizer, which training exports use too: nothing for bytes, the file for a tokenizer.json, and for a
    checkpoint's tokenizer its saved pair with model.pretrained cleared."""
    from transfusion.checkpoint.export import carry_tokenizer
    from transfusion.config import Config, to_dict
    from transfusion.pretrained.tokenizer import open_tokenizer
    from transfusion.tokenizer import ByteTokenizer, build_tokenizer

    config = to_dict(Config())
    assert carry_tokenizer(config, ByteTokenizer(), tmp_path) == {} and config["data"]["tokenizer"] == "bytes"
    config["data"]["tokenizer"] = "/somewhere/tokenizer.json"
    assert carry_tokenizer(config, None, tmp_path) == {"tokenizer.json": Path("/somewhere/tokenizer.json")}
    assert config["data"]["tokenizer"] == "tokenizer.json"
    hf_dir = tmp_path / "hf"
    tiny_tokenizer().save_pretrained(hf_dir)
    tok = open_tokenizer(hf_dir, vocab_rows=400)
    config["model"]["pretrained"], config["data"]["tokenizer"] = str(hf_dir), "pretrained"
    config["model"]["pretrained_layers"] = 1  # a run that kept the first layer: the export's n_layers says so
    files = carry_tokenizer(config, tok, tmp_path / "scratch")
    assert sorted(files) == sorted([SAVED, "tokenizer.json"]) and all(p.is_file() for p in files.values())
    assert config["model"]["pretrained"] == "" and config["data"]["tokenizer"] == SAVED
    assert config["model"]["pretrained_layers"] == 0
    back = build_tokenizer(str(files[SAVED]))
    assert (back.vocab_size, back.boi_id, back.encode(TEXTS[0])) == (tok.vocab_size, tok.boi_id, tok.encode(TEXTS[0]))
