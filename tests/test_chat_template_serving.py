"""The chat endpoint lays a text chat out with the checkpoint's chat template when the tokenizer has one (the ids
transformers' apply_chat_template gives, no BOS added), falls back to segments after BOS for a chat with an image,
and answers 400 when the template refuses the messages."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from test_server import png_b64  # noqa: E402

from transfusion.config import DiffusionConfig, ModelConfig  # noqa: E402
from transfusion.diffusion.schedule import NoiseSchedule  # noqa: E402
from transfusion.generation.engine import Engine  # noqa: E402
from transfusion.latents.vae import PixelCodec  # noqa: E402
from transfusion.model import build_model  # noqa: E402
from transfusion.serving.protocol import ServeLimits  # noqa: E402
from transfusion.serving.server import create_app  # noqa: E402
from transfusion.tokenizer import PretrainedTokenizer  # noqa: E402

TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the chat must not open with the "
            "assistant') }}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer() -> PretrainedTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what color is the sky on a clear day? blue, the sky is blue."] * 10, trainer)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return PretrainedTokenizer(tok, {"bos": "<|im_start|>", "eos": "<|im_end|>"}, TEMPLATE)


@pytest.fixture(scope="module")
def served():
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, patch_size=4), tok.vocab_size, 3).eval()
    eng = Engine(model, tok, NoiseSchedule(DiffusionConfig()), PixelCodec(), (2, 2), torch.device("cpu"),
                 precision="fp32")
    with TestClient(create_app(eng, model_name="tiny", limits=ServeLimits(max_steps=4, max_tokens=8))) as c:
        yield tok, c


def chat(client, messages, **extra):
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "max_images": 0,
                                                     "seed": 1, "ignore_eos": True, **extra})


def test_text_chat_goes_through_the_template(served):
    tok, client = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what color is the sky?"}]
    r = chat(client, messages)
    assert r.status_code == 200, r.text
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 3  # the template's own <|im_start|>s, none added
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    parts = [{"type": "text", "text": "what color "}, {"type": "text", "text": "is the sky?"}]
    r2 = chat(client, [messages[0], {"role": "user", "content": parts}])
    assert r2.json()["usage"]["prompt_tokens"] == len(ids)  # text parts are one content string
    assert r2.json()["choices"] == r.json()["choices"]


def test_chat_with_an_image_falls_back_to_segments(served):
    tok, client = served
    content = [{"type": "text", "text": "what color?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}}]
    r = chat(client, [{"role": "user", "content": content}])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 1 + len(tok.encode("what color?")) + 4 + 2  # BOS, text, image block


def test_template_refusal_is_a_400(served):
    _, client = served
    r = chat(client, [{"role": "assistant", "content": "hi"}])
    assert r.status_code == 400
    assert "chat template refused" in r.json()["error"]["message"]
