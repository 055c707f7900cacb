"""The compositional shapes world (v3): 1-4 hard-edged shapes per image, captions with counts, attributes and spatial
relations, and a documented set of compositions that never occur in training.

Shapes, palette and rasteriser are the v2 world's (``data_pipelines/shapes.py``), so the v2 single-object world
stays available; only scenes and captions are new. Coordinates are unit coordinates (x right, y down).

Scene kinds and their captions (each caption also exists without colors, GenEval style, for text -> image):

    single     "a red circle"                               ("a circle")
    pair       "a red circle and a blue square"             ("a circle and a square")
    relation   "a red circle to the left of a blue square"  ("a circle to the left of a square")
               relations: "to the left of", "to the right of", "above", "below"
    count      "three green triangles" (2-4 alike objects)  ("three triangles")

Held-out compositions (``HELDOUT``), absent from every training scene, image and caption:

    color-shape pairs    6 of the 18 (color, shape) objects never appear in training at all
    count-shape pairs    "three squares", "four triangles" (of any color) never appear in training
    relation triples     (circle, above, square) and (triangle, left of, circle): never captioned in training, in
                         either phrasing ("a square below a circle" is the same triple), and never *visible* in a
                         training image either: no two objects of a training scene (nor of an interleaved document's
                         images) stand in a held-out relation under GenEval's rule (``visible_relations``, the judge's
                         rule, checked with a slack of RELATION_SLACK for pixelisation). Before this rule 710 of the
                         demo's 20,000 training scenes showed one without saying so.
    object pairs         5 pairs of seen objects never appear together in a training scene

``unseen_kinds(prompt)`` names which of the four kinds (``UNSEEN_KINDS``: object, count_shape, relation, object_pair)
make a prompt unseen. The held-out split is stratified by index (``HELDOUT_STRATA``): of every 8 consecutive samples,
4 are unseen, one of each kind and unseen by that kind alone, and 4 are seen, cycling through the six GenEval tags
(``TAGS``); so any 8k first samples hold k images of each unseen kind (the default evaluation's 300: 37 or 38 each;
an unseen render never duplicates a training one, so the writer's skips of duplicates only pull later samples in).
``is_unseen(prompt)`` says whether a prompt is unseen. A render of the held-out split that is byte-identical to a
training render is never written (the shard writer checks hashes), so "held out" holds by content, not by file name.

Sizes: object half-size in [0.12, 0.19] of the image side; objects do not overlap (boxes keep a gap of 0.03). At
32 px (the default, the single-object world's size) the smallest object is ~8 px across; the strict judge reads
3,000 of 3,000 ground-truth renders right. (Before its sub-pixel template fit it read 998 / 1,000 here and 976 / 1,000
with half-sizes [0.10, 0.16], where ~6 px circles and squares look alike: the reason for these sizes.)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from data_pipelines.shapes import COLORS, SHAPES, Scene, ShapeObject, render

WORLD_VERSION = 3
IMAGE_SIZE = 32
HALF_SIZE_RANGE = (0.12, 0.19)
GAP = 0.03  # minimum distance between two objects' boxes (unit coordinates)
MARGIN = 0.02  # minimum distance of a box from the image border
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
KINDS = ("single", "pair", "relation", "count")
UNSEEN_KINDS = ("object", "count_shape", "relation", "object_pair")
# Of every len(HELDOUT_STRATA) consecutive held-out samples: one unseen by each kind alone, then `None` slots that
# draw seen prompts, cycling through TAGS.
HELDOUT_STRATA: tuple[str | None, ...] = (*UNSEEN_KINDS, None, None, None, None)
POSITION_MARGIN = 0.1  # GenEval's POSITION_THRESHOLD: each axis offset shrinks by this x the two boxes' sizes
RELATION_SLACK = 0.05  # training scenes avoid held-out relations down to a normalised offset of 0.5 - this
# Raised whenever the samples drawn for a seed change, so a dataset made by an older generator is not taken as current.
GENERATOR_REVISION = 2


def plural(shape: str) -> str:
    return shape + "s"


@dataclass(frozen=True)
class Heldout:
    color_shape: frozenset[tuple[str, str]]
    count_shape: frozenset[tuple[int, str]]
    relation: frozenset[tuple[str, str, str]]  # (shape a, relation, shape b), canonical and inverse both listed
    object_pairs: frozenset[frozenset[tuple[str, str]]]  # unordered pairs of (color, shape) objects


def _relation_set(triples: list[tuple[str, str, str]]) -> frozenset[tuple[str, str, str]]:
    return frozenset(triples + [(b, INVERSE[r], a) for a, r, b in triples])


HELDOUT = Heldout(
    color_shape=frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "circle"),
                           ("purple", "triangle"), ("cyan", "square")}),
    count_shape=frozenset({(3, "square"), (4, "triangle")}),
    relation=_relation_set([("circle", "above", "square"), ("triangle", "to the left of", "circle")]),
    object_pairs=frozenset(frozenset(p) for p in [
        (("red", "circle"), ("green", "square")), (("blue", "circle"), ("yellow", "triangle")),
        (("green", "triangle"), ("purple", "circle")), (("cyan", "circle"), ("red", "square")),
        (("yellow", "square"), ("blue", "triangle"))]),
)
SEEN_OBJECTS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT.color_shape)


# -- captions ----------------------------------------------------------------------------------------------------
def object_phrase(color: str | None, shape: str) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def count_phrase(n: int, color: str | None, shape: str) -> str:
    return " ".join(w for w in (COUNT_WORDS[n], color, plural(shape)) if w)


@dataclass(frozen=True)
class Prompt:
    """A caption and what it asks for (the judge's spec): ``objects`` lists (color or None, shape) per object."""

    text: str
    tag: str
    objects: tuple[tuple[str | None, str], ...]
    relation: str | None = None  # between objects[0] and objects[1]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tag": self.tag, "objects": [list(o) for o in self.objects],
                "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Prompt":
        return cls(str(d["text"]), str(d["tag"]), tuple((o[0], str(o[1])) for o in d["objects"]), d.get("relation"))


def prompt_text(tag: str, objects: tuple[tuple[str | None, str], ...], relation: str | None = None) -> str:
    if tag == "counting":
        return count_phrase(len(objects), objects[0][0], objects[0][1])
    if tag in ("single_object", "colors"):
        return object_phrase(*objects[0])
    a, b = object_phrase(*objects[0]), object_phrase(*objects[1])
    return f"{a} {relation} {b}" if tag == "position" else f"{a} and {b}"


def make_prompt(tag: str, objects: tuple[tuple[str | None, str], ...], relation: str | None = None) -> Prompt:
    return Prompt(prompt_text(tag, objects, relation), tag, objects, relation)


def unseen_kinds(p: Prompt) -> frozenset[str]:
    """Which held-out compositions (``UNSEEN_KINDS``) the prompt states: a held-out colored object, a held-out count
    of a shape, a held-out relation triple, a held-out pair of objects. Empty for a seen prompt."""
    colored = [(c, s) for c, s in p.objects if c is not None]
    kinds = set()
    if any(o in HELDOUT.color_shape for o in colored):
        kinds.add("object")
    if p.tag == "counting" and (len(p.objects), p.objects[0][1]) in HELDOUT.count_shape:
        kinds.add("count_shape")
    if p.tag == "position" and (p.objects[0][1], p.relation, p.objects[1][1]) in HELDOUT.relation:
        kinds.add("relation")
    if len(colored) == 2 and frozenset(colored) in HELDOUT.object_pairs:
        kinds.add("object_pair")
    return frozenset(kinds)


def is_unseen(p: Prompt) -> bool:
    """Whether the prompt asks for a held-out composition (never in training)."""
    return bool(unseen_kinds(p))


# -- scenes ------------------------------------------------------------------------------------------------------
def _place(rng: random.Random, halves: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Centers for boxes of the given half-sizes, inside the image and apart from each other (rejection sampling)."""
    for _ in range(tries):
        centers: list[tuple[float, float]] = []
        for h in halves:
            lo, hi = h + MARGIN, 1 - h - MARGIN
            cx, cy = round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 4)
            if all(abs(cx - x) >= h + g + GAP or abs(cy - y) >= h + g + GAP
                   for (x, y), g in zip(centers, halves)):
                centers.append((cx, cy))
            else:
                break
        if len(centers) == len(halves):
            return centers
    return None


def relation_holds(relation: str, a: ShapeObject, b: ShapeObject, dominance: float = 2.0) -> bool:
    """Whether ``a relation b`` holds clearly: the offset along the relation's axis is positive and ``dominance``
    times the offset across it (the generator's rule; the judge applies GenEval's)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy), "above": (-dy, dx),
                     "below": (dy, dx)}[relation]
    return along > 0 and along >= dominance * abs(across)


def visible_relations(a_center: tuple[float, float], a_size: tuple[float, float], b_center: tuple[float, float],
                      b_size: tuple[float, float], threshold: float = 0.5) -> set[str]:
    """GenEval's relative-position rule (the judge's): the relations of box a to box b ("to the left of", "above",
    ...) from box centres and sizes (x right, y down, any unit): each axis offset is shrunk by POSITION_MARGIN x (a's
    size + b's size) on that axis and normalised by the centres' distance; a relation holds when its normalised
    component is beyond ``threshold``. Two relations can hold at once (up and to the left)."""
    off = (a_center[0] - b_center[0], a_center[1] - b_center[1])
    revised = [max(abs(o) - POSITION_MARGIN * (sa + sb), 0.0) * (1 if o > 0 else -1 if o < 0 else 0)
               for o, sa, sb in zip(off, a_size, b_size)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    dist = (off[0] ** 2 + off[1] ** 2) ** 0.5
    dx, dy = revised[0] / dist, revised[1] / dist
    rel = set()
    if dx < -threshold:
        rel.add("to the left of")
    if dx > threshold:
        rel.add("to the right of")
    if dy < -threshold:
        rel.add("above")
    if dy > threshold:
        rel.add("below")
    return rel


def object_relations(a: ShapeObject, b: ShapeObject, threshold: float = 0.5) -> set[str]:
    """``visible_relations`` of two scene objects (unit coordinates, square boxes of side 2 x half-size)."""
    return visible_relations((a.cx, a.cy), (2 * a.half_size,) * 2, (b.cx, b.cy), (2 * b.half_size,) * 2, threshold)


def shows_heldout_relation(objs: list[ShapeObject], slack: float = RELATION_SLACK) -> bool:
    """Whether any two objects stand in a held-out relation triple under GenEval's rule, with ``slack`` below its 0.5
    threshold so that pixelisation cannot make a judge see one that the geometry does not."""
    return any((a.shape, r, b.shape) in HELDOUT.relation
               for a in objs for b in objs if a is not b and a.shape != b.shape
               for r in object_relations(a, b, 0.5 - slack))


def _objects(rng: random.Random, specs: list[tuple[str, str]], relation: str | None = None,
             avoid_heldout_relations: bool = False) -> list[ShapeObject]:
    """Objects of the given (color, shape) specs placed apart; with ``relation``, objects[0] stands in it to
    objects[1] (the generator's rule); with ``avoid_heldout_relations``, no two objects show a held-out relation."""
    while True:
        halves = [round(rng.uniform(*HALF_SIZE_RANGE), 4) for _ in specs]
        centers = _place(rng, halves)
        if centers is None:
            continue
        objs = [ShapeObject(s, c, "", cx, cy, h) for (c, s), (cx, cy), h in zip(specs, centers, halves)]
        if relation is not None and not relation_holds(relation, objs[0], objs[1]):
            continue
        if avoid_heldout_relations and shows_heldout_relation(objs):
            continue
        return objs


def sample_training_scene(rng: random.Random) -> tuple[Scene, Prompt]:
    """One training scene and its full caption (every object's color stated), never a held-out composition."""
    while True:
        kind = rng.choice(KINDS)
        if kind == "single":
            obj = rng.choice(SEEN_OBJECTS)
            prompt = make_prompt("colors", (obj,))
            return Scene(_objects(rng, [obj])), prompt
        if kind == "count":
            n = rng.randint(2, 4)
            obj = rng.choice(SEEN_OBJECTS)
            if (n, obj[1]) in HELDOUT.count_shape:
                continue
            prompt = make_prompt("counting", (obj,) * n)
            return Scene(_objects(rng, [obj] * n)), prompt  # one shape: no relation between two shapes
        a, b = rng.choice(SEEN_OBJECTS), rng.choice(SEEN_OBJECTS)
        if a[1] == b[1] or frozenset((a, b)) in HELDOUT.object_pairs:
            continue
        if kind == "pair":
            prompt = make_prompt("color_attr", (a, b))
            return Scene(_objects(rng, [a, b], avoid_heldout_relations=True)), prompt
        relation = rng.choice(RELATIONS)
        if (a[1], relation, b[1]) in HELDOUT.relation:
            continue
        prompt = make_prompt("position", (a, b), relation)
        return Scene(_objects(rng, [a, b], relation, avoid_heldout_relations=True)), prompt


def drop_colors(p: Prompt) -> Prompt:
    """The GenEval-style caption of the same scene without colors: colors -> single_object, color_attr ->
    two_object; counting and position keep their tag."""
    objects = tuple((None, s) for _, s in p.objects)
    tag = {"colors": "single_object", "color_attr": "two_object"}.get(p.tag, p.tag)
    return make_prompt(tag, objects, p.relation)


def all_eval_prompts() -> list[Prompt]:
    """Every prompt of every tag, seen and unseen (the held-out split samples from these)."""
    out: list[Prompt] = []
    colors = list(COLORS)
    for s in SHAPES:
        out.append(make_prompt("single_object", ((None, s),)))
        for c in colors:
            out.append(make_prompt("colors", ((c, s),)))
        for n in (2, 3, 4):
            out.append(make_prompt("counting", ((None, s),) * n))
    for i, s1 in enumerate(SHAPES):
        for s2 in SHAPES:
            if s1 == s2:
                continue
            if SHAPES.index(s2) > i:
                out.append(make_prompt("two_object", ((None, s1), (None, s2))))
            for r in RELATIONS:
                out.append(make_prompt("position", ((None, s1), (None, s2)), r))
            for c1 in colors:
                for c2 in colors:
                    if SHAPES.index(s2) > i:
                        out.append(make_prompt("color_attr", ((c1, s1), (c2, s2))))
    return out


def scene_for_prompt(rng: random.Random, p: Prompt) -> Scene:
    """A ground-truth scene for an eval prompt. Colors the prompt leaves free are drawn so that every object and
    object pair is a seen one, and no held-out relation shows unless the prompt states it: the prompt's own
    composition is the only thing that can be unseen."""
    while True:
        specs = [(c or rng.choice([c2 for c2, s2 in SEEN_OBJECTS if s2 == s]), s) for c, s in p.objects]
        if p.tag == "counting":  # "three circles": alike objects, one color
            specs = [specs[0]] * len(specs)
        stated = [(c, s) for c, s in p.objects if c is not None]
        if len(specs) == 2 and len(stated) < 2 and frozenset(specs) in HELDOUT.object_pairs:
            continue
        return Scene(_objects(rng, specs, p.relation, avoid_heldout_relations="relation" not in unseen_kinds(p)))


# -- samples -----------------------------------------------------------------------------------------------------
def sample_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.blake2b(f"shapes-v{WORLD_VERSION}:{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def training_sample(index: int, seed: int, size: int = IMAGE_SIZE, uncolored_share: float = 0.25):
    """(key, image, caption, record) for training sample ``index``; a share of captions drop their colors."""
    rng = random.Random(sample_seed(seed, "train", index))
    scene, prompt = sample_training_scene(rng)
    if rng.random() < uncolored_share:
        prompt = drop_colors(prompt)
    record = {**scene.to_dict(), "caption": prompt.text, "prompt": prompt.to_dict(), "image_size": size,
              "world": WORLD_VERSION}
    return f"train-{index:08d}", render(scene, size), prompt.text, record


def heldout_prompt(index: int, rng: random.Random) -> Prompt:
    """The prompt of held-out sample ``index``, by its stratum (``HELDOUT_STRATA``): for an unseen kind, a tag drawn
    uniformly among the tags that have prompts unseen by that kind alone, then one of those prompts; for a seen slot,
    the next tag in TAGS' cycle, then one of its seen prompts."""
    slot, block = index % len(HELDOUT_STRATA), index // len(HELDOUT_STRATA)
    kind = HELDOUT_STRATA[slot]
    prompts = all_eval_prompts()
    if kind is not None:
        pool = [p for p in prompts if unseen_kinds(p) == {kind}]
        tag = rng.choice(sorted({p.tag for p in pool}, key=TAGS.index))
        return rng.choice([p for p in pool if p.tag == tag])
    seen_slots = HELDOUT_STRATA.count(None)
    tag = TAGS[(block * seen_slots + HELDOUT_STRATA[:slot].count(None)) % len(TAGS)]
    return rng.choice([p for p in prompts if p.tag == tag and not is_unseen(p)])


def heldout_sample(index: int, seed: int, size: int = IMAGE_SIZE):
    """(key, image, caption, record) for held-out sample ``index``: a prompt of its stratum (``heldout_prompt``) and a
    ground-truth scene for it; ``record["unseen"]`` and ``record["unseen_kinds"]``."""
    rng = random.Random(sample_seed(seed, "heldout", index))
    prompt = heldout_prompt(index, rng)
    scene = scene_for_prompt(rng, prompt)
    record = {**scene.to_dict(), "caption": prompt.text, "prompt": prompt.to_dict(), "unseen": is_unseen(prompt),
              "unseen_kinds": sorted(unseen_kinds(prompt)), "image_size": size, "world": WORLD_VERSION}
    return f"heldout-{index:08d}", render(scene, size), prompt.text, record


def scene_compositions(scene: Scene) -> dict[str, Any]:
    """What a scene contains, for disjointness checks: its (color, shape) objects and object pairs."""
    objs = [(o.color, o.shape) for o in scene.objects]
    return {"objects": set(objs), "pairs": {frozenset((a, b)) for a in objs for b in objs if a != b}}


_WORD_COUNT = {w: n for n, w in COUNT_WORDS.items()}


def parse_prompt(text: str) -> Prompt:
    """The inverse of ``prompt_text``: a caption of this world's grammar -> its Prompt (tag, objects, relation).
    ValueError for text outside the grammar."""
    words = text.strip().lower().rstrip(".").split()
    colors, shapes = set(COLORS), set(SHAPES)

    def one(ws: list[str]) -> tuple[str | None, str]:
        if len(ws) == 2 and ws[0] == "a" and ws[1] in shapes:
            return None, ws[1]
        if len(ws) == 3 and ws[0] == "a" and ws[1] in colors and ws[2] in shapes:
            return ws[1], ws[2]
        raise ValueError(f"not an object phrase: {' '.join(ws)!r}")

    try:
        if words and words[0] in _WORD_COUNT and words[0] != "one":
            n, rest = _WORD_COUNT[words[0]], words[1:]
            color = rest[0] if len(rest) == 2 and rest[0] in colors else None
            shape = rest[-1][:-1] if rest and rest[-1].endswith("s") else ""
            if shape not in shapes or len(rest) != (2 if color else 1):
                raise ValueError
            return make_prompt("counting", ((color, shape),) * n)
        joined = " ".join(words)
        for rel in RELATIONS:
            if f" {rel} " in f" {joined} ":
                left, right = joined.split(f" {rel} ", 1)
                a, b = one(left.split()), one(right.split())
                if a[1] == b[1] or (a[0] is None) != (b[0] is None):
                    raise ValueError
                return make_prompt("position", (a, b), rel)
        if " and " in joined:
            left, right = joined.split(" and ", 1)
            a, b = one(left.split()), one(right.split())
            if a[1] == b[1] or (a[0] is None) != (b[0] is None):
                raise ValueError
            return make_prompt("color_attr" if a[0] else "two_object", (a, b))
        obj = one(words)
        return make_prompt("colors" if obj[0] else "single_object", (obj,))
    except ValueError:
        raise ValueError(f"{text!r} is not a prompt of the compositional shapes world (e.g. 'a red circle', "
                         f"'two blue squares', 'a circle to the left of a triangle')") from None


def interleaved_sample(index: int, seed: int, size: int = IMAGE_SIZE):
    """An interleaved training document: text, image, text about the image, a second image::

        "a red circle" <image: the circle> "then a blue square appears to the left of it" <image: both>

    Returns (key, [image, image], segments, record); every object, pair and stated relation is a seen composition."""
    rng = random.Random(sample_seed(seed, "train-interleaved", index))
    while True:
        a, b = rng.choice(SEEN_OBJECTS), rng.choice(SEEN_OBJECTS)
        if a[1] != b[1] and frozenset((a, b)) not in HELDOUT.object_pairs:
            break
    first, second = _objects(rng, [a, b], avoid_heldout_relations=True)
    relation = next((r for r in RELATIONS if relation_holds(r, second, first)
                     and (b[1], r, a[1]) not in HELDOUT.relation), None)
    then = f"then {object_phrase(*b)} appears" + (f" {relation} it" if relation else "")
    segments = [{"text": object_phrase(*a)}, {"image": 0}, {"text": then}, {"image": 1}]
    scenes_ = [Scene([first]), Scene([first, second])]
    record = {"segments": segments, "scenes": [s.to_dict() for s in scenes_], "image_size": size,
              "world": WORLD_VERSION}
    return f"train-{index:08d}", [render(s, size) for s in scenes_], segments, record
