"""A pretrained checkpoint's tokenizer: the ids transformers gives (a real GGUF and a tiny HF directory), our special
ids after the checkpoint's rows, the round trip through save / build_tokenizer, and the chat template rendered as
transformers renders it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import smollm2_gguf
from transfusion.pretrained.tokenizer import TokenizerError, open_tokenizer
from transfusion.tokenizer import SAVED, PretrainedTokenizer, build_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: héllo wörld, 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint({k: v for k, v in zip('ab', [1, 2])})",
    "numbers 1234567 and 3.14159, URLs https://example.com/a?b=c",
]
CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What color is the sky on a clear day?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And at night? <|im_start|>"}]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') tokenizers of the real SmolLM2 GGUF."""
    path = smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return open_tokenizer(path, vocab_rows=49152), hf


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained here, wrapped and written by transformers' ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                      "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    out = tmp_path_factory.mktemp("tiny_tok")
    fast.save_pretrained(out)
    return out


def test_smollm2_gguf_ids_equal_transformers(smollm2):
    ours, hf = smollm2
    for text in TEXTS:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.pad_id == hf.pad_token_id


def test_smollm2_new_special_ids_follow_the_rows(smollm2):
    ours, _ = smollm2
    new = [ours.boi_id, ours.eoi_id, ours.image_id]
    assert sorted(new) == [49152, 49153, 49154] and ours.vocab_size == 49155
    # typed control tokens stay text: never the checkpoint's id or ours
    ids = ours.encode("<|im_start|> <|boi|>")
    assert not set(ids) & {ours.bos_id, ours.eos_id, *new}


def test_chat_template_renders_as_transformers(smollm2):
    ours, hf = smollm2
    assert ours.chat_template == hf.chat_template
    for messages in (CHAT[1:2], CHAT, CHAT[:2]):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(messages) == text
        assert ours.render_chat(messages, add_generation_prompt=False) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False)
        hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert ours.encode_chat(messages) == list(hf_ids["input_ids"])


def test_tiny_hf_dir_ids_and_specials(tiny_hf_dir):
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir), local_files_only=True)
    rows = len(hf) + 7  # an embedding padded beyond the tokenizer (as Qwen's is)
    ours = open_tokenizer(tiny_hf_dir, vocab_rows=rows)
    for text in TEXTS:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert sorted([ours.boi_id, ours.eoi_id, ours.image_id]) == [rows, rows + 1, rows + 2]
    assert ours.vocab_size == rows + 3
    assert ours.render_chat(CHAT) == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_missing_specials_are_new_ids(tiny_hf_dir, tmp_path):
    import shutil

    for name in ("tokenizer.json",):
        shutil.copy(tiny_hf_dir / name, tmp_path / name)
    ours = open_tokenizer(tmp_path, vocab_rows=10)  # no config: no BOS / EOS / PAD named, no template
    size = ours._inner
    ids = [getattr(ours, f"{n}_id") for n in ("pad", "bos", "eos", "boi", "eoi", "image")]
    assert sorted(ids) == list(range(size, size + 6)) and ours.vocab_size == size + 6
    assert ours.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.render_chat(CHAT)


def test_save_and_build_tokenizer_round_trip(tiny_hf_dir, tmp_path):
    ours = open_tokenizer(tiny_hf_dir, vocab_rows=500)
    meta = ours.save(tmp_path / "export")
    assert meta.name == SAVED and (tmp_path / "export" / "tokenizer.json").is_file()
    for spec in (str(meta), str(tmp_path / "export")):
        back = build_tokenizer(spec)
        assert isinstance(back, PretrainedTokenizer)
        for name in ("pad", "bos", "eos", "boi", "eoi", "image"):
            assert getattr(back, f"{name}_id") == getattr(ours, f"{name}_id")
        assert back.vocab_size == ours.vocab_size == 503
        assert back.chat_template == ours.chat_template
        assert back.render_chat(CHAT) == ours.render_chat(CHAT)
        for text in TEXTS:
            assert back.encode(text) == ours.encode(text)
        assert back.encode_chat(CHAT) == ours.encode_chat(CHAT)


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(TokenizerError, match="neither"):
        open_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        open_tokenizer(tmp_path)
    (tmp_path / SAVED).write_text("{}")
    with pytest.raises(TokenizerError, match="not a saved pretrained tokenizer"):
        build_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="model.pretrained"):
        build_tokenizer("pretrained")
