"""The continuous-batching scheduler: batched output equals one-at-a-time (per seed), cancellation frees a slot,
special ids are never sampled as text, stop strings cut the stream, images go through the request's own generator."""

from __future__ import annotations

import torch
from helpers import GRID, TOK, tiny_model

from transfusion.config import DiffusionConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.generation.engine import Engine
from transfusion.latents.vae import PixelCodec
from transfusion.generation.prefix import concat_prefixes
from transfusion.generation.sampling import sample_next
from transfusion.serving.scheduler import SamplingParams, Scheduler


def engine(boi_bias: float = 0.0, seed: int = 0) -> Engine:
    model = tiny_model(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked distribution: greedy and sampled text differ
        model.lm_head.weight[TOK.boi_id] += boi_bias * model.norm.weight.sign()  # makes BOI likely when asked
    return Engine(model, TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID, torch.device("cpu"),
                  precision="fp32")


def run(sched: Scheduler, ids: list[int], max_steps: int = 200) -> dict[int, list]:
    out: dict[int, list] = {i: [] for i in ids}
    for _ in range(max_steps):
        if not sched.busy():
            break
        for ev in sched.step():
            out[ev.request_id].append(ev)
    return out


def summary(events: list) -> tuple[str, list[torch.Tensor], str | None]:
    text = "".join(e.data for e in events if e.kind == "text")
    images = [e.data["image"] for e in events if e.kind == "image"]
    done = next((e.data["finish_reason"] for e in events if e.kind == "done"), None)
    return text, images, done


REQUESTS = [("a red circle", SamplingParams(max_tokens=12, seed=1)),
            ("blue", SamplingParams(max_tokens=9, temperature=1.0, seed=2)),
            ("a much longer prompt here", SamplingParams(max_tokens=15, temperature=0.8, top_k=20, seed=3)),
            ("x", SamplingParams(max_tokens=6, temperature=1.2, top_p=0.9, seed=4))]


def test_batched_equals_one_at_a_time():
    eng = engine()
    together = Scheduler(eng, max_batch=8)
    ids = [together.submit(p, params) for p, params in REQUESTS]
    batched = run(together, ids)
    for rid, (prompt, params) in zip(ids, REQUESTS):
        alone = Scheduler(eng, max_batch=1)
        one = alone.submit(prompt, params)
        assert summary(run(alone, [one])[one]) == summary(batched[rid])
    texts = [summary(batched[r])[0] for r in ids]
    assert len(set(texts)) == len(texts) and all(texts)  # four different, non-empty continuations
    assert all(summary(batched[r])[2] == "length" for r in ids)


def test_images_use_the_request_generator_and_batch_mates_do_not_matter():
    eng = engine(boi_bias=50.0)
    params = SamplingParams(max_tokens=4, max_images=1, steps=3, guidance=2.0, seed=7)
    alone = Scheduler(eng)
    one = alone.submit("a red circle", params)
    ref_text, ref_images, _ = summary(run(alone, [one])[one])
    assert len(ref_images) == 1 and ref_images[0].shape == (3, 8, 8)
    mixed = Scheduler(eng)
    ids = [mixed.submit("blue", SamplingParams(max_tokens=5, max_images=1, steps=3, seed=9)),
           mixed.submit("a red circle", params)]
    text, images, _ = summary(run(mixed, ids)[ids[1]])
    assert text == ref_text and torch.allclose(images[0], ref_images[0], atol=1e-4)
    other = Scheduler(eng)
    j = other.submit("a red circle", SamplingParams(max_tokens=4, max_images=1, steps=3, seed=8))
    assert not torch.allclose(summary(run(other, [j])[j])[1][0], ref_images[0])  # the seed matters


def test_special_ids_are_never_sampled_and_boi_respects_max_images():
    eng = engine(boi_bias=50.0)
    with torch.no_grad():  # make PAD, the image placeholder and EOI the most likely tokens
        for tid in (TOK.pad_id, TOK.image_id, TOK.eoi_id, TOK.bos_id):
            eng.model.lm_head.weight[tid] += 80 * eng.model.norm.weight.sign()
    sched = Scheduler(eng)
    rid = sched.submit("hi", SamplingParams(max_tokens=8, max_images=0, temperature=1.0, seed=0))
    run(sched, [rid])
    req = sched.requests[rid]
    assert req.images == 0 and len(req.tokens) == 8
    assert not {TOK.pad_id, TOK.image_id, TOK.eoi_id, TOK.bos_id, TOK.boi_id} & set(req.tokens)


def test_cancel_frees_the_slot_at_the_next_step():
    sched = Scheduler(engine(), max_batch=2)
    a, b, c = (sched.submit(p, SamplingParams(max_tokens=30, seed=i)) for i, p in enumerate(["a", "b", "c"]))
    sched.step()
    assert [r.id for r in sched.running()] == [a, b] and sched.requests[c].phase == "queued"
    sched.cancel(a)
    events = sched.step()
    assert any(e.request_id == a and e.kind == "cancelled" for e in events)
    assert sorted(r.id for r in sched.running()) == [b, c]
    assert sched.requests[a].prefix is None  # its caches are gone


def test_stop_strings_cut_the_stream():
    eng = engine()
    free = Scheduler(eng)
    rid = free.submit("a red circle", SamplingParams(max_tokens=12, seed=1))
    full = summary(run(free, [rid])[rid])[0]
    stop = full[4:6]
    cut = full.index(stop)
    sched = Scheduler(eng)
    rid = sched.submit("a red circle", SamplingParams(max_tokens=12, seed=1, stop=(stop,)))
    text, _, reason = summary(run(sched, [rid])[rid])
    assert text == full[:cut] and reason == "stop" and sched.requests[rid].text == text


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert sample_next(logits, SamplingParams(), g) == 3
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert draws == {2, 3}
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(200)}
    assert draws == {3}  # p(3) = 0.64 >= 0.5 alone


def guided_at_scale_one(eng: Engine, cond, unc, steps: int, generator: torch.Generator, monkeypatch) -> torch.Tensor:
    """The guided path forced at guidance 1: every pass runs the unconditional rows too ([cond; uncond] stacked) and
    combines them as unc + 1 (cond - unc); the fast path skips them at scale 1, so this drives the job by hand."""
    from transfusion.generation.denoise import DenoisingJob

    with monkeypatch.context() as m:
        m.setattr(DenoisingJob, "pass_guided", property(lambda self: self.guided))
        job = eng.start_image(cond.next_pos.shape[0], guided=True, guidance=1.0, sampler=None, steps=steps,
                              generator=generator, guidance_schedule="constant")
        both = concat_prefixes(cond, unc)
        while not job.done:
            x, t, mask = job.block_input()
            out = eng.image_block(both, job.block_pass, job.rows(x), t, job.rows(mask))
            assert out.shape[0] == 2 * x.shape[0]  # the unconditional rows were computed
            job.advance(out)
        return job.result()


def test_cfg_scale_one_is_no_cfg_and_cfg_moves_toward_the_condition(monkeypatch):
    """Scale 1 computed through the guidance machinery (unconditional rows run and weighed by 1) equals running without
    the unconditional pass, in the engine and in the scheduler. An oracle image head: conditional rows predict +1,
    unconditional rows -1, so guided output must be unc + w (cond - unc) = 2w - 1 at every step."""
    from types import SimpleNamespace

    eng = engine()
    eng.model.image_head.image_out.proj.weight.data.normal_(std=0.05)  # predictions that depend on the prefix
    cond = eng.prefill([[TOK.bos_id] + TOK.encode("red") + [TOK.boi_id]] * 2)
    unc = eng.prefill([[TOK.bos_id, TOK.boi_id]] * 2)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = guided_at_scale_one(eng, cond, unc, 3, g(), monkeypatch)
    b = eng.denoise(cond, uncond=None, guidance=1.0, sampler=None, steps=3, generator=g())
    unc_only = eng.denoise(unc, uncond=None, guidance=1.0, sampler=None, steps=3, generator=g())
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(unc_only, b, atol=1e-3)  # the rows differ
    sched = Scheduler(eng)  # the scheduler's guidance-1 request (its own stacking) equals the engine's image
    rid = sched.submit("red", SamplingParams(max_tokens=1, steps=3, guidance=1.0, seed=0, start_with_image=True))
    served = summary(run(sched, [rid])[rid])[1][0]
    assert torch.allclose(served, eng.text_to_image(["red"], steps=3, guidance=1.0, seed=0)[0], atol=1e-5)

    seen = []

    def oracle(pre, x_t, t):
        n = x_t.shape[0]
        sign = torch.ones(n) if n == 2 else torch.cat((torch.ones(n // 2), -torch.ones(n // 2)))
        return sign[:, None, None, None].expand_as(x_t).clone()

    class Recorder:
        def __init__(self, steps):
            self.timesteps = torch.arange(steps, 0, -1)

        def step(self, out, t, x, generator=None):
            seen.append(out.clone())
            return SimpleNamespace(prev_sample=x)

    eng.image_block_prediction = oracle
    eng.schedule.sampler = lambda name, steps: Recorder(steps)
    for w in (1.0, 2.0, 3.5):
        seen.clear()
        eng.denoise(cond, uncond=unc, guidance=w, sampler=None, steps=4, generator=g(), guidance_schedule="constant")
        assert len(seen) == 4 and all(torch.allclose(o, torch.full_like(o, 2 * w - 1)) for o in seen)
    seen.clear()  # the linear schedule rises from 1 towards w
    eng.denoise(cond, uncond=unc, guidance=3.0, sampler=None, steps=4, generator=g(), guidance_schedule="linear")
    scales = [float(o.flatten()[0] + 1) / 2 for o in seen]
    assert scales == sorted(scales) and abs(scales[-1] - 3.0) < 1e-6 and scales[0] > 1.0


def test_engine_generate_streams_interleaved_text_and_images():
    """``Engine.generate``: an image when BOI is sampled (its clean image then joins the cache with EOI), then text
    again; max_images caps the images; special ids never come out as text."""
    eng = engine(boi_bias=50.0)
    with torch.no_grad():  # specials are the likeliest tokens: generate must still never emit them
        for tid in (TOK.pad_id, TOK.image_id, TOK.eoi_id, TOK.bos_id):
            eng.model.lm_head.weight[tid] += 80 * eng.model.norm.weight.sign()
    pieces = list(eng.generate("a red circle", max_tokens=6, steps=2, guidance=2.0, seed=0, max_images=1))
    kinds = [k for k, _ in pieces]
    image = next(v for k, v in pieces if k == "image")
    assert image.shape == (3, 8, 8) and kinds.count("image") == 1 and kinds.count("text") == 5
    assert 0 < kinds.index("image") < 5  # text, the image, text again
    again = list(eng.generate("a red circle", max_tokens=6, steps=2, guidance=2.0, seed=0, max_images=1))
    assert [k for k, _ in again] == kinds and torch.equal(next(v for k, v in again if k == "image"), image)
    # the scheduler produces the same stream for the same request
    sched = Scheduler(eng)
    rid = sched.submit("a red circle", SamplingParams(max_tokens=5, max_images=1, steps=2, guidance=2.0, seed=0))
    text, images, _ = summary(run(sched, [rid])[rid])
    assert text == "".join(v for k, v in pieces if k == "text") and torch.allclose(images[0], image, atol=1e-5)
    plain = engine()
    text = list(plain.generate("a red circle", max_tokens=5, steps=2, seed=0, max_images=0))
    assert text and all(k == "text" for k, _ in text) and len(text) <= 5


def test_held_back_text_is_released_when_decided():
    """A tail that might start a stop string, or an unfinished UTF-8 character, is not sent until decided; the
    concatenated deltas always equal the final text."""
    eng = engine()
    sched = Scheduler(eng)
    rid = sched.submit("a red circle", SamplingParams(max_tokens=12, seed=1, stop=("\\x00never",)))
    events = run(sched, [rid])[rid]
    text, _, reason = summary(events)
    assert reason == "length" and text == sched.requests[rid].text
    req = sched.requests[rid]
    req.text, req.emitted = "ab\ufffd", 0
    assert [e.data for e in sched._emit(req, 2)] == ["ab"] and sched._emit(req, 2) == []


def test_image_passes_of_different_requests_share_one_forward():
    """Two requests whose images start at different steps denoise in the same forward passes (each row at its own
    timestep, guided rows against the one shared unconditional prefix), and each image equals the request alone."""
    eng = engine(boi_bias=50.0)
    params = [SamplingParams(max_tokens=3, max_images=1, steps=4, guidance=2.0, seed=1),
              SamplingParams(max_tokens=3, max_images=1, steps=4, guidance=1.0, seed=2)]
    alone = []
    for prompt, p in zip(["blue", "blue"], params):
        s = Scheduler(eng)
        rid = s.submit(prompt, p)
        alone.append(summary(run(s, [rid])[rid]))
    calls = []
    block = eng.image_block
    eng.image_block = lambda pre, kind, x, t, mask: calls.append(x.shape[0]) or block(pre, kind, x, t, mask)
    sched = Scheduler(eng)
    a = sched.submit("blue", params[0])
    first = sched.step()  # a is admitted and samples its first token; b joins one step later
    b = sched.submit("blue", params[1])
    out = run(sched, [a, b])
    out[a] = first + out[a]
    for rid, ref in zip((a, b), alone):
        text, images, _ = summary(out[rid])
        assert text == ref[0] and torch.allclose(images[0], ref[1][0], atol=1e-4)
    assert 3 in calls  # a's two guided rows and b's one row in one pass while both denoise
    assert len(calls) < 8  # fewer passes than the 4 + 4 of running them apart


def test_previews_are_clean_estimates_and_the_last_is_close_to_the_image():
    eng = engine(boi_bias=50.0)
    sched = Scheduler(eng)
    rid = sched.submit("blue", SamplingParams(max_tokens=2, max_images=1, steps=6, seed=3, preview_every=2))
    events = run(sched, [rid])[rid]
    previews = [e.data for e in events if e.kind == "preview"]
    start = next(e.data for e in events if e.kind == "image_start")
    image = next(e.data["image"] for e in events if e.kind == "image")
    assert start["passes"] == 6 and [p["pass"] for p in previews] == [2, 4]
    assert all(p["image"].shape == image.shape and p["image"].abs().max() <= 1 for p in previews)
    first, last = ((p["image"] - image).abs().mean() for p in previews)
    assert last < first  # the estimate converges towards the final image


def test_prompt_images_are_read_like_captioning():
    """A prompt made of an image segment is the captioning layout: greedy text equals ``Engine.caption``, also where
    special ids are the likeliest tokens (both ban the same ids: plain captioning too, since guidance 1 and > 1 ban
    alike)."""
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for specials_first in (False, True):
        eng = engine()
        if specials_first:
            bias = torch.zeros(TOK.vocab_size)
            bias[[TOK.pad_id, TOK.bos_id, TOK.boi_id, TOK.image_id, TOK.eoi_id]] = 1e3
            logits = eng.model.text_logits
            eng.model.text_logits = lambda h: logits(h) + bias
        sched = Scheduler(eng)
        ids = [sched.submit([img[i]], SamplingParams(max_tokens=10, max_images=0)) for i in range(2)]
        out = run(sched, ids)
        texts = [summary(out[i])[0] for i in ids]
        assert texts == eng.caption(img, max_tokens=10) and all(len(sched.requests[i].tokens) == 10 for i in ids)


def test_prefix_reuse_equals_recomputing_the_prefix():
    eng = engine()
    prompts = [[TOK.bos_id] + TOK.encode("a red circle") + [TOK.boi_id], [TOK.bos_id] + TOK.encode("x") + [TOK.boi_id]]
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    cached = eng.denoise(eng.prefill(prompts), uncond=eng.prefill([[TOK.bos_id, TOK.boi_id]] * 2), guidance=2.5,
                         sampler=None, steps=5, generator=g())
    again = eng.denoise_recomputing(prompts, guidance=2.5, sampler=None, steps=5, generator=g())
    assert torch.allclose(cached, again, atol=1e-5) and cached.abs().max() > 0.1


def test_mar_requests_batch_and_match_the_head_alone():
    from test_mar import mar_model, wake

    model = wake(mar_model(num_iter=3))
    with torch.no_grad():
        model.lm_head.weight[TOK.boi_id] += 50.0 * model.norm.weight.sign()
    eng = Engine(model, TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID, torch.device("cpu"),
                 precision="fp32")
    params = SamplingParams(max_tokens=2, max_images=1, steps=3, guidance=2.0, seed=5)
    alone = Scheduler(eng)
    rid = alone.submit("blue", params)
    ref = summary(run(alone, [rid])[rid])[1][0]
    both = Scheduler(eng)
    ids = [both.submit("blue", params), both.submit("b", SamplingParams(max_tokens=2, steps=3, seed=6))]
    assert torch.allclose(summary(run(both, ids)[ids[0]])[1][0], ref, atol=1e-4)


def test_start_with_image_is_text_to_image_and_ignore_eos_fills_max_tokens():
    eng = engine()
    sched = Scheduler(eng)
    params = SamplingParams(max_tokens=7, steps=4, guidance=2.5, seed=11, start_with_image=True, ignore_eos=True)
    rid = sched.submit("a red circle", params)
    events = run(sched, [rid])[rid]
    assert [e.kind for e in events][:2] == ["image_start", "image"]  # the answer begins with the image
    text, images, reason = summary(events)
    ref = eng.text_to_image(["a red circle"], steps=4, guidance=2.5, seed=11)[0]
    assert torch.allclose(images[0], ref, atol=1e-5)
    assert len(sched.requests[rid].tokens) == 7 and reason == "length"


def test_a_request_that_stops_early_leaves_its_batch_mates_unchanged():
    """Stop strings end a request in the middle of a batched step; every other request keeps its whole cache
    (found in review: batch-mates lost their oldest key) and its output equals running alone."""
    eng = engine()
    free = Scheduler(eng)
    rid = free.submit("a red circle", SamplingParams(max_tokens=12, seed=1))
    full = summary(run(free, [rid])[rid])[0]
    stopper = SamplingParams(max_tokens=12, seed=1, stop=(full[2:4],))
    mates = [("blue", SamplingParams(max_tokens=10, temperature=1.0, seed=s)) for s in range(5)]
    sched = Scheduler(eng)
    ids = [sched.submit("a red circle", stopper)] + [sched.submit(p, params) for p, params in mates]
    out = run(sched, ids)
    assert summary(out[ids[0]])[2] == "stop"
    for rid, (prompt, params) in zip(ids[1:], mates):
        alone = Scheduler(eng)
        one = alone.submit(prompt, params)
        (t1, i1, r1), (t2, i2, r2) = summary(run(alone, [one])[one]), summary(out[rid])
        assert (t1, r1, len(i1)) == (t2, r2, len(i2)) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(i1, i2))


def test_extreme_temperatures_do_not_break_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 5.0, 3.0])
    assert sample_next(logits, SamplingParams(temperature=1e-38), g) == 2  # greedy, no overflow
    assert sample_next(logits, SamplingParams(temperature=1e-3), g) == 2
    assert sample_next(logits, SamplingParams(temperature=10.0, top_p=1e-9), g) == 2


def test_prefix_reuse_equals_recomputation_with_images_in_the_prompt():
    eng = engine()
    P = eng.num_patches
    seq = [TOK.bos_id] + TOK.encode("a") + [TOK.boi_id] + [TOK.image_id] * P + [TOK.eoi_id] + TOK.encode("b") + \
        [TOK.boi_id]
    img = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spans = [(0, 3)]
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    cached = eng.denoise(eng.prefill([seq], img, spans), uncond=eng.prefill([[TOK.bos_id, TOK.boi_id]]),
                         guidance=2.0, sampler=None, steps=4, generator=g())
    again = eng.denoise_recomputing([seq], guidance=2.0, sampler=None, steps=4, generator=g(), images=img,
                                    image_spans=spans)
    assert torch.allclose(cached, again, atol=1e-5)
    without = eng.denoise_recomputing([seq], guidance=2.0, sampler=None, steps=4, generator=g())
    assert not torch.allclose(cached, without, atol=1e-3)  # the prompt's image matters


def test_interval_guidance_skips_unconditional_rows_and_equals_computing_them(monkeypatch):
    """Passes whose guidance scale is 1 (the interval schedule's ends) run the conditional rows only; the images equal
    the naive path that computes the unconditional rows on every pass, in the engine and in the scheduler, where an
    interval request shares passes with a constantly guided one."""
    from transfusion.generation.denoise import DenoisingJob

    eng = engine()
    prompts = [[TOK.bos_id] + TOK.encode("a red circle") + [TOK.boi_id], [TOK.bos_id] + TOK.encode("x") + [TOK.boi_id]]
    cond, unc = eng.prefill(prompts), eng.prefill([[TOK.bos_id, TOK.boi_id]] * 2)
    rows = []
    block = eng.image_block
    eng.image_block = lambda pre, kind, x, t, mask: rows.append(x.shape[0]) or block(pre, kind, x, t, mask)

    def images():
        fast = eng.denoise(cond, uncond=unc, guidance=2.5, sampler=None, steps=10, guidance_schedule="interval",
                           generator=torch.Generator().manual_seed(4))
        sched = Scheduler(eng)
        ids = [sched.submit("a red circle", SamplingParams(max_tokens=1, steps=10, guidance=2.5, seed=5,
                                                           start_with_image=True, guidance_schedule=s))
               for s in ("interval", "constant")]
        out = run(sched, ids)
        return fast, [summary(out[i])[1][0] for i in ids]

    fast, served = images()
    # 10 DDIM passes at EDM sigma 2e4, 6.4, 3.1, 2.0, 1.4, 1.0, 0.74, 0.52, 0.34, 0.17: guided (4 rows) inside
    # (0.28, 5.42], the conditional rows alone (2) outside
    assert rows[:10] == [2, 2, 4, 4, 4, 4, 4, 4, 4, 2]
    assert 3 in rows[10:]  # in the scheduler: the interval request's lone row beside the constant one's two
    monkeypatch.setattr(DenoisingJob, "pass_guided", property(lambda self: self.guided))  # the naive path
    rows.clear()
    slow, served_slow = images()
    assert rows[:10] == [4] * 10
    assert torch.allclose(fast, slow, atol=1e-5) and fast.abs().max() > 0.1
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(served, served_slow))


def test_interval_window_follows_the_data_std_in_engine_scheduler_and_reference():
    """``sample.guidance_data_std`` moves the interval's noise window with the data's std: at 1.0 (unit-std latents,
    the latent codec's default) the window is (0.56, 10.84], at 0.5 (pixels' default) EDM2's (0.28, 5.42] as before.
    The cached engine, the scheduler and the recomputing reference gate the same passes and give the same images."""
    from transfusion.config import load_config
    from transfusion.generation.engine import codec_data_std
    from transfusion.latents.vae import VAECodec

    assert codec_data_std(PixelCodec()) == 0.5 and codec_data_std(VAECodec.__new__(VAECodec)) == 1.0
    eng = engine()
    assert eng.guidance_data_std == 0.5
    prompts = [[TOK.bos_id] + TOK.encode("a red circle") + [TOK.boi_id], [TOK.bos_id] + TOK.encode("x") + [TOK.boi_id]]
    cond, unc = eng.prefill(prompts), eng.prefill([[TOK.bos_id, TOK.boi_id]] * 2)
    rows: list[int] = []
    block = eng.image_block
    eng.image_block = lambda pre, kind, x, t, mask: rows.append(x.shape[0]) or block(pre, kind, x, t, mask)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    kw = dict(guidance=2.5, sampler=None, steps=10, guidance_schedule="interval")
    # DDIM at 10 steps, EDM sigma 2e4, 6.4, 3.1, 2.0, 1.4, 1.0, 0.74, 0.52, 0.34, 0.17: 4 rows where guided
    want = {1.0: [2, 4, 4, 4, 4, 4, 4, 2, 2, 2], 0.5: [2, 2, 4, 4, 4, 4, 4, 4, 4, 2]}
    images = {}
    for std, pattern in want.items():
        eng.cfg = load_config(None, [f"--sample.guidance_data_std={std}"])
        assert eng.guidance_data_std == std
        rows.clear()
        fast = eng.denoise(cond, uncond=unc, generator=g(), **kw)
        assert rows == pattern
        rows.clear()
        naive = eng.denoise_recomputing(prompts, generator=g(), **kw)
        assert rows == pattern
        sched = Scheduler(eng)
        rid = sched.submit(prompts[0][1:-1], SamplingParams(max_tokens=1, steps=10, guidance=2.5, seed=4,
                                                            start_with_image=True, guidance_schedule="interval"))
        served = summary(run(sched, [rid])[rid])[1][0]
        assert torch.allclose(fast, naive, atol=1e-5) and fast.abs().max() > 0.1
        assert torch.allclose(served, eng.codec.decode(fast[:1])[0].clamp(-1, 1), atol=1e-5)
        images[std] = fast
    assert not torch.allclose(images[1.0], images[0.5], atol=1e-3)  # the window moved, and so did the images
