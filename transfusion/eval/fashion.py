"""Evaluation on real images (Fashion-MNIST held-out shards from ``tools/make_fashion_shards.py``).

Report keys (``<run>/eval/report.json``):
    cas.{seen,unseen}          classification accuracy score: images generated from held-out captions written with
                               training templates (seen) or held-out templates (unseen), num_t2i each,
                               labelled by a classifier
                               trained here on the real training images, against the class the caption asked for
    cas.classifier_test_accuracy   that classifier on the real test images (the ceiling CAS is read against)
    caption.accuracy           the class named in the model's greedy caption of a real test image
    <rate>_se                  beside each rate above (cas.seen_se, ..., caption.accuracy_se): its binomial standard
                               error over the n images it was measured on (``stats.binomial_se``, None for n = 0)
    fid.*                      generated (seen prompts) vs real test images, ``compositional.fid_report`` (FID with its
                               interval and KID with its std, ``scores.feature_scores``); the floor: two disjoint
                               halves of the real test images at the same count

The classifier is a small CNN trained on the training split's pair samples (``train_classifier``); it is cached next to
the held-out shard (``cas_classifier.pt``, with the training shards' names) so every run is judged by the same one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_pipelines.fashion import CLASSES, class_of_caption
from transfusion.eval.stats import binomial_se
from transfusion.generation.images import decode_images


def is_fashion_record(record) -> bool:
    return isinstance(record, dict) and "template_seen" in record and "label" in record


class SmallCNN(nn.Module):
    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 7 * 7, 128), nn.Linear(128, classes)

    def forward(self, x_N1HW: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x_N1HW, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def to_gray(images_NCHW: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> one channel (the mean of RGB)."""
    return images_NCHW.float().mean(dim=1, keepdim=True)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 3, seed: int = 0,
                     batch_size: int = 128) -> SmallCNN:
    """A CNN on real images [N, C, H, W] in [-1, 1] with labels [N] (a few minutes of CPU for 60k images)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = to_gray(images)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def classify(model: SmallCNN, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    x = to_gray(images)
    return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


def classifier_source(cfg) -> tuple[Path, str]:
    """(cache file, pixel training shards) of the CAS classifier: the *pixel* training split beside the held-out
    shard (``tools/make_fashion_shards.py`` writes them together), so a latent run is judged by the same classifier
    as a pixel run; else the run's own training shards."""
    folder = Path(cfg.data.eval_shards.split("{")[0]).parent
    pixel_train = sorted(folder.glob("train-*.tar"))
    return folder / "cas_classifier.pt", (str(folder / "train-*.tar") if pixel_train else cfg.data.shards)


def load_or_train_classifier(cache: Path, train_shards: str, image_size: int, progress: bool = True) -> SmallCNN:
    from data_pipelines.shards import iter_decoded_samples

    from data_pipelines.shards import expand_shard_spec

    if cache.is_file():  # the cache names the shards it was trained on; any spelling of the same files matches
        state = torch.load(cache, map_location="cpu", weights_only=True)
        cached = state.get("train_shards")
        if cached and sorted(expand_shard_spec(cached)) == sorted(expand_shard_spec(train_shards)):
            model = SmallCNN()
            model.load_state_dict(state["model"])
            return model.eval()
    images, labels = [], []
    for _, img, _, record in iter_decoded_samples(train_shards, image_size, "txt"):
        if isinstance(record, dict) and "label" in record:
            images.append(img)
            labels.append(int(record["label"]))
    if not images:
        raise FileNotFoundError(f"no labelled training images in {train_shards} for the CAS classifier")
    t0 = time.perf_counter()
    model = train_classifier(torch.stack(images), torch.tensor(labels))
    if progress:
        print(f"trained the CAS classifier on {len(images)} real images in {time.perf_counter() - t0:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "train_shards": train_shards}, cache)
    return model


def evaluate_fashion(engine, samples: list, *, num_t2i: int, num_caption: int, num_fid: int, batch_size: int,
                     steps: int, guidance: float, sampler: str, guidance_schedule: str, seed: int,
                     max_caption_tokens: int, latents: bool, progress: bool = True, out_dir: Path | None = None,
                     classifier: SmallCNN | None = None, caption_guidance: float = 1.0) -> dict:
    cfg = engine.cfg

    def pixels(rows):
        imgs = torch.stack([im for _, im, _, _ in rows])
        if latents:
            imgs = decode_images(engine.codec, imgs.to(engine.device))
        return imgs

    if classifier is None:
        classifier = load_or_train_classifier(*classifier_source(cfg), cfg.data.image_size, progress)
    report: dict = {"world": "fashion"}
    distinct = {}
    for row in samples:  # each test image appears with a seen and an unseen template
        distinct.setdefault(row[3].get("test_index", row[0]), row)
    real_rows = list(distinct.values())
    real = pixels(real_rows)
    real_labels = torch.tensor([r[3]["label"] for r in real_rows])
    test_acc = float((classify(classifier, real) == real_labels).float().mean())
    report["cas"] = {"classifier_test_accuracy": test_acc,
                     "classifier_test_accuracy_se": binomial_se(test_acc, len(real_rows))}

    t0 = time.perf_counter()
    generated = generate_by_template(engine, samples, num_t2i=num_t2i, num_fid=num_fid, batch_size=batch_size,
                                     steps=steps, guidance=guidance, sampler=sampler,
                                     guidance_schedule=guidance_schedule, seed=seed)
    n_gen = sum(len(x[0]) for v in generated.values() for x in v)
    report["timings"] = {"t2i_seconds_per_image": (time.perf_counter() - t0) / max(n_gen, 1)}
    report["cas"] |= cas_scores(classifier, generated, num_t2i)

    t0 = time.perf_counter()
    rows = real_rows[:num_caption]
    report["caption"] = caption_accuracy(engine, rows, batch_size=batch_size, max_caption_tokens=max_caption_tokens,
                                         latents=latents, caption_guidance=caption_guidance)
    report["timings"]["caption_seconds_per_image"] = (time.perf_counter() - t0) / max(len(rows), 1)

    if num_fid and generated[True]:  # the same FID / KID and floor as report v2, on distinct real test images
        from transfusion.eval.compositional import fid_report

        report["fid"] = fid_report(engine, real_rows, torch.cat([p[0] for p in generated[True]]), num_fid,
                                   latents=latents)
    if out_dir is not None and generated[True]:
        save_grids(Path(out_dir), generated)
    return report


def generate_by_template(engine, samples: list, *, num_t2i: int, num_fid: int, batch_size: int, steps: int,
                         guidance: float, sampler: str, guidance_schedule: str, seed: int) -> dict[bool, list]:
    """Images from the held-out captions of seen (True) and unseen (False) templates: per template kind a list of
    (images, labels, captions) chunks; the seen kind gets as many as FID / KID ask for (``num_fid``)."""
    generated: dict[bool, list] = {True: [], False: []}
    for seen in (True, False):  # FID / KID read the seen-template images: as many as num_fid asks for
        count = max(num_t2i, num_fid) if seen else num_t2i
        rows = [r for r in samples if r[3]["template_seen"] == seen][:count]
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            imgs = engine.text_to_image([c for _, _, c, _ in chunk], steps=steps, guidance=guidance,
                                        sampler=sampler, seed=seed + i, guidance_schedule=guidance_schedule)
            generated[seen].append((imgs, torch.tensor([c[3]["label"] for c in chunk]), [c[2] for c in chunk]))
    return generated


def cas_scores(classifier: SmallCNN, generated: dict[bool, list], num_t2i: int) -> dict:
    """Classification accuracy score of the generated images per template kind, with standard errors and counts."""
    cas = {}
    for seen, parts in generated.items():
        if parts:
            imgs, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            imgs, labels = imgs[:num_t2i], labels[:num_t2i]  # seen and unseen over the same count (FID reads all)
            split = "seen" if seen else "unseen"
            cas[split] = float((classify(classifier, imgs) == labels).float().mean())
            cas[f"{split}_se"] = binomial_se(cas[split], len(imgs))
            cas["n_" + split] = len(imgs)
    return cas


def caption_accuracy(engine, rows: list, *, batch_size: int, max_caption_tokens: int, latents: bool,
                     caption_guidance: float) -> dict:
    """Greedy captions of real test images: the share naming the image's class, its standard error, examples."""
    correct, examples = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        texts = engine.caption(torch.stack([im for _, im, _, _ in chunk]), max_caption_tokens, latents=latents,
                               guidance=caption_guidance)
        for (_, _, _, rec), text in zip(chunk, texts):
            correct.append(class_of_caption(text) == rec["label"])
            if len(examples) < 12:
                examples.append({"class": rec["class"], "caption": text})
    accuracy = sum(correct) / max(len(correct), 1)
    return {"accuracy": accuracy, "accuracy_se": binomial_se(accuracy, len(correct)), "n": len(correct),
            "examples": examples}


def save_grids(out_dir: Path, generated: dict[bool, list]) -> None:
    """The first chunk of seen-template (and unseen-template) images as grids beside the report."""
    from transfusion.generation.grid import make_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    imgs, _, caps = generated[True][0]
    make_grid(imgs[:32], caps[:32], cols=8).save(out_dir / "t2i_seen.png")
    if generated[False]:
        imgs, _, caps = generated[False][0]
        make_grid(imgs[:32], caps[:32], cols=8).save(out_dir / "t2i_unseen.png")
