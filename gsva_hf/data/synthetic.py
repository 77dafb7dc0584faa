"""A synthetic generalized-referring-segmentation task written in the exact gRefCOCO layout.

Coloured shapes on muted backgrounds, referred to by expressions that name one object, several objects, no
present object (mostly hard negatives that share a colour or a shape with something in the image) or one object
by its position relative to another. Because the files mirror `grefs(unc).json` + `instances.json` + COCO-named
images inside GSVA's data tree, the project's gRefCOCO reader, collator, trainer and evaluator run on it unchanged,
which makes it the small end-to-end task the tiny preset trains on in CPU minutes.

Every pixel of a shape is painted from the mask that pycocotools decodes from the stored polygon, so the masks the
reader builds agree with the image exactly. Output is deterministic: the same arguments give byte-identical files.

    python -m gsva_hf.data.synthetic --out data/synthetic
"""

import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..cli import CommandParser, refuse_link

SPLITS = ("train", "val", "testA", "testB")
DEFAULT_NUM_IMAGES = {"train": 4000, "val": 250, "testA": 250, "testB": 250}

# Saturated, hue-separated colours; backgrounds are low-saturation greys, so no background pixel comes near them.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
    "cyan": (30, 200, 210),
    "orange": (245, 140, 20),
    "pink": (245, 120, 190),
}
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
DEFAULT_SHAPES = ("circle", "square", "triangle", "star")
ALL_SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
KINDS = ("single", "attribute", "multi", "relational")

# Circumradius of each shape relative to the drawn size, chosen so the shapes cover similar areas.
_EXTENT = {"circle": 0.9, "square": 1.0, "triangle": 1.15, "star": 1.1, "diamond": 1.0, "hexagon": 0.95}
_MAX_EXTENT = max(_EXTENT.values())

# Per split: objects per image, refs per image, share of absent refs, share of hard negatives among them.
# Evaluation splits are harder-negative-rich; testA is crowded (relations, more distractors), testB sparse.
SPLIT_DEFAULTS = {
    "train": {"objects": (1, 4), "refs": (3, 6), "absent_rate": 0.33, "hard_negative_rate": 0.8},
    "val": {"objects": (1, 4), "refs": (2, 4), "absent_rate": 0.4, "hard_negative_rate": 0.95},
    "testA": {"objects": (3, 4), "refs": (2, 4), "absent_rate": 0.4, "hard_negative_rate": 0.95},
    "testB": {"objects": (1, 2), "refs": (2, 4), "absent_rate": 0.4, "hard_negative_rate": 0.95},
}
# Relative frequency of the kinds of refs with a present target.
DEFAULT_KIND_WEIGHTS = {"single": 0.5, "attribute": 0.15, "multi": 0.2, "relational": 0.15}

GREFS_NAME = "grefs(unc).json"
MANIFEST_NAME = "synthetic_grefcoco.json"
LABELS_NAME = "synthetic_labels.json"
IMAGE_SUBDIR = Path("refer_seg", "images", "mscoco", "images", "train2014")
GREFCOCO_SUBDIR = Path("refer_seg", "grefcoco")
FILE_PATTERN = "COCO_train2014_%012d.png"


@dataclass
class _Object:
    color: str
    shape: str
    polygon: list
    bbox: list
    area: float
    rgb: tuple

    @property
    def center(self):
        """Relations are judged on bbox centres, which anyone can recompute from `instances.json`."""
        x, y, w, h = self.bbox
        return (x + w / 2.0, y + h / 2.0)


@dataclass
class _Ref:
    sentence: str
    targets: list
    kind: str
    negative: str = ""


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def phrase(color: str | None, shape: str | None, many: bool = False) -> str:
    """`the red circle`, `the circles`, `the blue shape`, `the shape`: the only noun-phrase grammar of the task."""
    noun = shape or "shape"
    words = ["the"] + ([color] if color else []) + [plural(noun) if many else noun]
    return " ".join(words)


def matches(objects: list, color: str | None, shape: str | None) -> list:
    return [i for i, o in enumerate(objects)
            if (color is None or o.color == color) and (shape is None or o.shape == shape)]


def shape_polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Vertices (N, 2) in pixel coordinates; circles are fine 48-gons so the polygon is the shape."""
    radius = size * _EXTENT[shape]
    if shape == "circle":
        thetas = np.arange(48) * (2 * math.pi / 48)
        radii = np.full(48, radius)
    elif shape == "star":
        thetas = -math.pi / 2 + angle + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.5)
    else:
        sides, offset = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2), "diamond": (4, 0.0),
                         "hexagon": (6, 0.0)}[shape]
        thetas = offset + angle + np.arange(sides) * (2 * math.pi / sides)
        radii = np.full(sides, radius)
    return np.stack([cx + radii * np.cos(thetas), cy + radii * np.sin(thetas)], axis=1)


def decode_rle(rle: dict) -> np.ndarray:
    """pycocotools' decode under NumPy 2 warns about `copy=False` on every call; the result is unaffected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A muted grey (slightly tinted) that is plain, lightly noisy or a soft gradient; noise is shared by the channels
    so backgrounds stay unsaturated and never look like a palette colour."""
    style = ("plain", "noise", "gradient")[int(rng.integers(3))]
    base = rng.uniform(75, 175) + rng.uniform(-10, 10, size=3)
    if style == "plain":
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif style == "noise":
        noise = np.clip(rng.normal(0.0, 5.0, size=(size, size, 1)), -12, 12)
        img = base + noise
    else:
        direction = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        ramp = (xs * math.cos(direction) + ys * math.sin(direction))[..., None]
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6) - 0.5
        img = base + ramp * rng.uniform(20, 45)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), style


def _layout(rng, size, n_objects, colors, shapes, duplicate_rate):
    """Non-overlapping shapes (with a gap) so every instance mask is the exact set of its painted pixels."""
    gap = max(2.0, size * 0.025)
    lo, hi = size * 0.085, size * 0.15
    for _ in range(100):
        placed = []
        for _ in range(n_objects):
            for _ in range(200):
                s = rng.uniform(lo, hi)
                margin = s * _MAX_EXTENT + 1
                cx, cy = rng.uniform(margin, size - margin, size=2)
                if all(math.hypot(cx - px, cy - py) >= (s + ps) * _MAX_EXTENT + gap for px, py, ps in placed):
                    placed.append((cx, cy, s))
                    break
            else:
                break
        if len(placed) == n_objects:
            break
    else:
        raise RuntimeError(f"could not place {n_objects} shapes in a {size}x{size} image")
    kinds = []
    for _ in range(n_objects):
        if kinds and rng.random() < duplicate_rate:
            kinds.append(kinds[int(rng.integers(len(kinds)))])
        else:
            kinds.append((colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))]))
    return placed, kinds


def _draw_image(rng, size, n_objects, colors, shapes, duplicate_rate):
    image, style = _background(rng, size)
    placed, kinds = _layout(rng, size, n_objects, colors, shapes, duplicate_rate)
    objects = []
    painted = np.zeros((size, size), dtype=bool)
    for (cx, cy, s), (color, shape) in zip(placed, kinds):
        angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-10, 10))
        poly = [round(float(v), 2) for v in shape_polygon(shape, cx, cy, s, angle).reshape(-1)]
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], size, size))
        m = decode_rle(rle)
        if (m & painted).any() or not m.any():
            raise RuntimeError("overlapping or empty shape; layout invariant broken")
        painted |= m
        rgb = tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in PALETTE[color])
        image[m] = rgb
        bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
        objects.append(_Object(color, shape, poly, bbox, float(mask_utils.area(rle)), rgb))
    return image, objects, style


def _pick(rng, options):
    return options[int(rng.integers(len(options)))] if options else None


def _single(rng, objects, used, colors, shapes):
    options = []
    for color, shape in sorted({(o.color, o.shape) for o in objects}):
        idx = matches(objects, color, shape)
        sentence = phrase(color, shape, len(idx) > 1)
        if sentence not in used:
            options.append(_Ref(sentence, idx, "single"))
    return _pick(rng, options)


def _attribute(rng, objects, used, colors, shapes):
    descs = [(c, None) for c in sorted({o.color for o in objects})]
    descs += [(None, s) for s in sorted({o.shape for o in objects})]
    options = []
    for color, shape in descs:
        idx = matches(objects, color, shape)
        sentence = phrase(color, shape, len(idx) > 1)
        if sentence not in used:
            options.append(_Ref(sentence, idx, "attribute"))
    return _pick(rng, options)


def _multi(rng, objects, used, colors, shapes):
    descs = sorted({(o.color, o.shape) for o in objects})
    options = []
    for i, a in enumerate(descs):
        for b in descs[i + 1:]:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            ia, ib = matches(objects, *first), matches(objects, *second)
            sentence = f"{phrase(*first, len(ia) > 1)} and {phrase(*second, len(ib) > 1)}"
            if sentence not in used:
                options.append(_Ref(sentence, sorted(ia + ib), "multi"))
    return _pick(rng, options)


def relation_holds(objects, subject, anchor, relation, margin):
    """Which candidates lie on the named side of the anchor, or None when any candidate is too close to call.

    A relational expression is only written when every candidate sits at least `margin` pixels from the anchor's
    centre along the relation's axis and exactly one of them is on the named side.
    """
    axis, sign = RELATIONS[relation]
    anchor_c = objects[anchor].center[axis]
    hits = []
    for i in subject:
        delta = (objects[i].center[axis] - anchor_c) * sign
        if abs(delta) < margin:
            return None
        if delta > 0:
            hits.append(i)
    return hits


def _relational(rng, objects, used, colors, shapes, margin):
    """`the circle left of the square`: a unique anchor, a subject phrase, and exactly one clear match."""
    found_colors = sorted({o.color for o in objects})
    found_shapes = sorted({o.shape for o in objects})
    subject_descs = [(None, None)] + [(c, None) for c in found_colors] + [(None, s) for s in found_shapes]
    subject_descs += sorted({(o.color, o.shape) for o in objects})
    needed, redundant = [], []
    for a, anchor in enumerate(objects):
        anchor_descs = [d for d in ((None, anchor.shape), (anchor.color, None), (anchor.color, anchor.shape))
                        if matches(objects, *d) == [a]]
        for anchor_desc in anchor_descs:
            for subject_desc in subject_descs:
                if subject_desc == anchor_desc:
                    continue
                candidates = [i for i in matches(objects, *subject_desc) if i != a]
                if not candidates:
                    continue
                for relation in RELATIONS:
                    hits = relation_holds(objects, candidates, a, relation, margin)
                    if hits is None or len(hits) != 1:
                        continue
                    sentence = f"{phrase(*subject_desc)} {relation} {phrase(*anchor_desc)}"
                    if sentence in used:
                        continue
                    ref = _Ref(sentence, hits, "relational")
                    (needed if len(candidates) > 1 else redundant).append(ref)
    # Prefer expressions where the relation is what disambiguates the subject.
    if needed and (not redundant or rng.random() < 0.7):
        return _pick(rng, needed)
    return _pick(rng, redundant)


def negative_type(objects, color, shape) -> str:
    """How an absent colour+shape relates to the image: `both`, `color` or `shape` are hard negatives."""
    has_color = any(o.color == color for o in objects)
    has_shape = any(o.shape == shape for o in objects)
    return {(True, True): "both", (True, False): "color", (False, True): "shape", (False, False): "easy"}[
        (has_color, has_shape)
    ]


def _absent(rng, objects, used, colors, shapes, hard, negative_kinds=None):
    """An absent colour+shape, hard (sharing a colour and/or a shape with a present object) when asked and possible.
    Hard ones are drawn uniformly among all candidates, or with `negative_kinds` ({"color": w, "shape": w, "both": w})
    first a kind by weight among those this image offers, then a candidate of it."""
    present = {(o.color, o.shape) for o in objects}
    pools = {kind: [] for kind in ("both", "color", "shape", "easy")}
    hard_pool = []
    for color in colors:
        for shape in shapes:
            if (color, shape) in present:
                continue
            sentence = phrase(color, shape)
            if sentence in used:
                continue
            kind = negative_type(objects, color, shape)
            pools[kind].append(_Ref(sentence, [], "absent", kind))
            if kind != "easy":
                hard_pool.append(pools[kind][-1])
    if not hard:
        return _pick(rng, pools["easy"] or hard_pool)
    if negative_kinds is None or not hard_pool:
        return _pick(rng, hard_pool or pools["easy"])
    offered = [k for k in ("both", "color", "shape") if pools[k] and negative_kinds.get(k, 0) > 0]
    if not offered:
        return _pick(rng, hard_pool)
    weights = np.array([negative_kinds[k] for k in offered], dtype=float)
    return _pick(rng, pools[offered[int(rng.choice(len(offered), p=weights / weights.sum()))]])


def _image_refs(rng, objects, opts, colors, shapes, kind_weights, margin):
    n_refs = int(rng.integers(opts["refs"][0], opts["refs"][1] + 1))
    n_absent = min(int(rng.binomial(n_refs, opts["absent_rate"])), n_refs - 1)
    kinds = [k for k in KINDS if kind_weights.get(k, 0) > 0]
    weights = np.array([kind_weights[k] for k in kinds], dtype=float)
    makers = {
        "single": _single,
        "attribute": _attribute,
        "multi": _multi,
        "relational": lambda *a: _relational(*a, margin),
    }
    refs, used = [], set()
    for _ in range(n_absent):
        hard = rng.random() < opts["hard_negative_rate"]
        ref = _absent(rng, objects, used, colors, shapes, hard, opts.get("negative_kinds"))
        if ref:
            refs.append(ref)
            used.add(ref.sentence)
    # Few distinct objects leave few things to say; capping keeps the kind mix near its weights.
    n_present = min(n_refs - n_absent, len({(o.color, o.shape) for o in objects}) + 1)
    for _ in range(n_present):
        # Kinds in a weighted random order: when one is impossible here (a lone object has no relation), the next
        # stands in at its own rate instead of one fixed fallback swelling.
        order = rng.choice(len(kinds), size=len(kinds), replace=False, p=weights / weights.sum())
        for kind in (kinds[int(i)] for i in order):
            ref = makers[kind](rng, objects, used, colors, shapes)
            if ref:
                refs.append(ref)
                used.add(ref.sentence)
                break
    return [refs[i] for i in rng.permutation(len(refs))]


def _raw_text(rng, sentence):
    """`raw` keeps the look of typed text (capital, full stop); `sent` is the cleaned lower-case form."""
    raw = sentence[0].upper() + sentence[1:] if rng.random() < 0.3 else sentence
    return raw + "." if rng.random() < 0.3 else raw


def _check_options(colors, shapes, num_images, image_size, split_options, kind_weights):
    unknown = [c for c in colors if c not in PALETTE]
    if unknown or len(set(colors)) != len(colors) or len(colors) < 2:
        raise ValueError(f"colors must be at least 2 distinct names from {sorted(PALETTE)}; got {list(colors)}")
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown or len(set(shapes)) != len(shapes) or len(shapes) < 2:
        raise ValueError(f"shapes must be at least 2 distinct names from {list(ALL_SHAPES)}; got {list(shapes)}")
    bad = [s for s in num_images if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; gRefCOCO splits are {list(SPLITS)}")
    if any(int(n) < 0 for n in num_images.values()):
        raise ValueError(f"image counts must be >= 0; got {num_images}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 so four shapes fit; got {image_size}")
    for split, opts in split_options.items():
        lo, hi = opts["objects"]
        if not 1 <= lo <= hi <= 4:
            raise ValueError(f"{split}: objects per image must satisfy 1 <= min <= max <= 4; got {opts['objects']}")
        lo, hi = opts["refs"]
        if not 1 <= lo <= hi:
            raise ValueError(f"{split}: refs per image must satisfy 1 <= min <= max; got {opts['refs']}")
        for key in ("absent_rate", "hard_negative_rate"):
            if not 0.0 <= float(opts[key]) <= 1.0:
                raise ValueError(f"{split}: {key} must be in [0, 1]; got {opts[key]}")
        if opts.get("negative_kinds") is not None:
            check_negative_kinds(opts["negative_kinds"], f"{split}: negative_kinds")
    if not any(kind_weights.get(k, 0) > 0 for k in KINDS) or any(k not in KINDS for k in kind_weights):
        raise ValueError(f"kind_weights needs positive weights for kinds among {list(KINDS)}; got {kind_weights}")


def check_negative_kinds(weights, where: str) -> None:
    """`negative_kinds` must weigh some of the three hard kinds, with finite weights >= 0 and one of them positive."""
    if (
        not isinstance(weights, dict)
        or set(weights) - {"both", "color", "shape"}
        or any(not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0) for w in weights.values())
        or not any(w > 0 for w in weights.values())
    ):
        raise ValueError(
            f"{where} must map some of 'both', 'color', 'shape' to finite weights >= 0, one of them positive; "
            f"got {weights!r}"
        )


def read_image_objects(dataset_dir, split: str) -> tuple[list[dict], dict[int, list[dict]]]:
    """The images of `split` (records of synthetic_labels.json) and, per image, its objects as instances.json
    annotations with their `color` and `shape` added."""
    root = Path(dataset_dir)
    labels_path, instances_path = root / LABELS_NAME, root / GREFCOCO_SUBDIR / "instances.json"
    for path in (labels_path, instances_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {root} must hold the synthetic task (python -m gsva_hf.data.synthetic)")
    labels = json.loads(labels_path.read_text())
    attributes = {a["id"]: (a["color"], a["shape"]) for a in labels["annotations"]}
    objects: dict[int, list[dict]] = {}
    for ann in json.loads(instances_path.read_text())["annotations"]:
        if ann["id"] not in attributes:
            raise ValueError(f"{instances_path}: annotation {ann['id']} has no colour in {labels_path}")
        color, shape = attributes[ann["id"]]
        objects.setdefault(ann["image_id"], []).append({**ann, "color": color, "shape": shape})
    records = [image for image in labels["images"] if image["split"] == split and image["id"] in objects]
    return records, objects


def read_image_contents(dataset_dir, split: str) -> tuple[list[dict], dict[int, set[tuple[str, str]]]]:
    """The images of `split` (records of synthetic_labels.json) and the (colour, shape) pairs each one holds."""
    records, objects = read_image_objects(dataset_dir, split)
    return records, {image_id: {(o["color"], o["shape"]) for o in found} for image_id, found in objects.items()}


GENERATOR = "gsva_hf.data.synthetic"  # the manifest's `generator`: what marks a tree this module wrote
OUTPUT_FILES = (GREFCOCO_SUBDIR / GREFS_NAME, GREFCOCO_SUBDIR / "instances.json", Path(LABELS_NAME),
                Path(MANIFEST_NAME), Path("README.txt"))


def _earlier_image_count(manifest: Path) -> int:
    """How many images (ids 1..N) an earlier run wrote, read from its manifest; a manifest this generator did not
    write is refused."""
    try:
        data = json.loads(manifest.read_text())
        counts = data["parameters"]["num_images"] if data["generator"] == GENERATOR else None
        if isinstance(counts, dict) and all(isinstance(n, int) and n >= 0 for n in counts.values()):
            return sum(counts.values())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise FileExistsError(
        f"{manifest} is not a manifest this generator wrote (expected generator {GENERATOR!r} and "
        "parameters.num_images); refusing to write over its tree: choose another --out"
    )


def _prepare_dir(root: Path, num_images: dict):
    """Remove what an earlier run here wrote, and only that: its annotation files and the images its own manifest
    covers (regular files in its image folder, named as it names them; never a file a labels list names). Refuse
    before removing anything when a file this run writes exists and no earlier run here wrote it (a real gRefCOCO
    release above all), or when a path it writes is a symbolic link."""
    manifest, images = root / MANIFEST_NAME, root / IMAGE_SUBDIR
    for folder in (*IMAGE_SUBDIR.parents, IMAGE_SUBDIR, *GREFCOCO_SUBDIR.parents, GREFCOCO_SUBDIR):
        if folder != Path(".") and (root / folder).is_symlink():
            raise FileExistsError(f"{root / folder} is a symbolic link; the generator never writes through one")
    for name in OUTPUT_FILES:
        path = root / name
        if path.is_symlink() or path.exists() and not path.is_file():
            raise FileExistsError(f"{path} is a symbolic link or a folder; the generator writes a file there")
        if path.exists() and not manifest.exists():
            raise FileExistsError(
                f"{path} exists and was not written by this generator (no {MANIFEST_NAME} beside it); refusing to "
                "overwrite it: choose another --out"
            )
    earlier = _earlier_image_count(manifest) if manifest.exists() else 0
    pattern = re.compile(FILE_PATTERN.replace("%012d", r"(\d{12})").replace(".", r"\."))
    stale = []
    for path in sorted(images.iterdir()) if images.is_dir() else []:
        found = pattern.fullmatch(path.name)
        if found is None or not 1 <= int(found.group(1)) <= max(earlier, sum(num_images.values())):
            continue  # a file this run neither wrote before nor writes now
        if path.is_symlink() or not path.is_file():
            raise FileExistsError(f"{path} is a symbolic link or a folder; the generator writes an image there")
        if int(found.group(1)) > earlier:
            raise FileExistsError(
                f"{path} was not written by this generator (no manifest of an earlier run here covers it); "
                "refusing to replace it: remove it or choose another --out"
            )
        stale.append(path)
    for name in OUTPUT_FILES if manifest.exists() else ():  # annotations first: a cut run leaves no mixed tree
        if name != Path(MANIFEST_NAME):
            (root / name).unlink(missing_ok=True)
    for path in stale:
        path.unlink()
    images.mkdir(parents=True, exist_ok=True)
    (root / GREFCOCO_SUBDIR).mkdir(parents=True, exist_ok=True)
    # The image counts go down first, so a run cut short still leaves the record of which images are its own.
    first = {"generator": GENERATOR, "parameters": {"num_images": num_images}}
    manifest.write_text(json.dumps(first, indent=2, allow_nan=False) + "\n")


def write_synthetic_grefcoco(
    dataset_dir,
    num_images: dict | None = None,
    image_size: int = 128,
    seed: int = 0,
    colors=DEFAULT_COLORS,
    shapes=DEFAULT_SHAPES,
    split_options: dict | None = None,
    kind_weights: dict | None = None,
    duplicate_rate: float = 0.15,
    relation_margin: float | None = None,
) -> dict:
    """Write the synthetic task as `dataset_dir/refer_seg/{grefcoco,images}` and return the manifest.

    num_images: images per split (missing splits use `DEFAULT_NUM_IMAGES`, 0 writes none).
    split_options: per-split overrides of `SPLIT_DEFAULTS` (`objects`, `refs` as (min, max); `absent_rate`,
        `hard_negative_rate` in [0, 1]; `negative_kinds`, e.g. {"color": 2, "shape": 1, "both": 1}: how often each
        kind of hard negative is drawn, where the image offers it; absent, all candidates are equally likely).
    kind_weights: relative frequency of present-target kinds (`single`, `attribute`, `multi`, `relational`).
    duplicate_rate: chance that an object repeats an earlier colour+shape, so one phrase covers several instances.
    relation_margin: pixels a relational candidate must sit from the anchor along the axis (default 8% of the size).
    Each image draws from its own generator seeded by (seed, split, index), so one split's content does not depend
    on another's size.
    """
    start = time.perf_counter()
    num_images = {**DEFAULT_NUM_IMAGES, **(num_images or {})}
    split_opts = {s: dict(SPLIT_DEFAULTS[s]) for s in SPLITS}
    for split, overrides in (split_options or {}).items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in split_options; gRefCOCO splits are {list(SPLITS)}")
        split_opts[split].update(overrides)
    kind_weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
    colors, shapes = tuple(colors), tuple(shapes)
    _check_options(colors, shapes, num_images, image_size, split_opts, kind_weights)
    margin = round(image_size * 0.08, 2) if relation_margin is None else float(relation_margin)

    root = Path(dataset_dir)
    _prepare_dir(root, {s: int(num_images[s]) for s in SPLITS})
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(shapes)]
    category_of = {s: i + 1 for i, s in enumerate(shapes)}

    images, annotations, refs = [], [], []
    label_images, label_anns, label_refs = [], [], []
    stats = {}
    image_id, ann_id, ref_id, sent_id = 1, 1, 0, 0
    for split_index, split in enumerate(SPLITS):
        opts = split_opts[split]
        split_stats = {"images": 0, "objects": 0, "refs": 0, "sentences": 0, "multi_target_refs": 0,
                       "no_target_refs": 0, "hard_negative_refs": 0, "kinds": {k: 0 for k in KINDS + ("absent",)},
                       "negatives": {"both": 0, "color": 0, "shape": 0, "easy": 0}}
        for index in range(int(num_images[split])):
            rng = np.random.default_rng([seed, split_index, index])
            n_objects = int(rng.integers(opts["objects"][0], opts["objects"][1] + 1))
            pixels, objects, style = _draw_image(rng, image_size, n_objects, colors, shapes, duplicate_rate)
            file_name = FILE_PATTERN % image_id
            Image.fromarray(pixels).save(root / IMAGE_SUBDIR / file_name, format="PNG", compress_level=6)
            images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
            label_images.append({"id": image_id, "split": split, "file_name": file_name, "background": style})
            ids = []
            for obj in objects:
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": category_of[obj.shape],
                    "segmentation": [obj.polygon], "area": obj.area, "bbox": obj.bbox, "iscrowd": 0,
                })
                label_anns.append({"id": ann_id, "color": obj.color, "shape": obj.shape, "rgb": list(obj.rgb)})
                ids.append(ann_id)
                ann_id += 1
            for ref in _image_refs(rng, objects, opts, colors, shapes, kind_weights, margin):
                empty = not ref.targets
                raw = _raw_text(rng, ref.sentence)
                refs.append({
                    "ref_id": ref_id, "image_id": image_id,
                    "ann_id": [-1] if empty else [ids[i] for i in ref.targets],
                    "category_id": [-1] if empty else [category_of[objects[i].shape] for i in ref.targets],
                    "split": split,
                    "sentences": [{"sent": ref.sentence, "raw": raw, "tokens": ref.sentence.split(),
                                   "sent_id": sent_id}],
                    "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.png",
                    "no_target": empty, "sent_ids": [sent_id],
                })
                label_refs.append({"ref_id": ref_id, "kind": ref.kind, "negative": ref.negative})
                split_stats["refs"] += 1
                split_stats["sentences"] += 1
                split_stats["kinds"][ref.kind] += 1
                split_stats["multi_target_refs"] += len(ref.targets) > 1
                split_stats["no_target_refs"] += empty
                if empty:
                    split_stats["negatives"][ref.negative] += 1
                    split_stats["hard_negative_refs"] += ref.negative != "easy"
                ref_id += 1
                sent_id += 1
            split_stats["images"] += 1
            split_stats["objects"] += len(objects)
            image_id += 1
        if split_stats["no_target_refs"]:
            share = split_stats["hard_negative_refs"] / split_stats["no_target_refs"]
            split_stats["hard_negative_share"] = round(share, 4)
        stats[split] = split_stats

    instances = {
        "info": {"description": "synthetic coloured-shapes task in the gRefCOCO layout (gsva_hf.data.synthetic)"},
        "images": images, "annotations": annotations, "categories": categories,
    }
    grefcoco = root / GREFCOCO_SUBDIR
    (grefcoco / GREFS_NAME).write_text(json.dumps(refs, allow_nan=False))
    (grefcoco / "instances.json").write_text(json.dumps(instances, allow_nan=False))
    (root / LABELS_NAME).write_text(json.dumps({"images": label_images, "annotations": label_anns, "refs": label_refs}, allow_nan=False))
    manifest = {
        "generator": GENERATOR,
        "format": "gRefCOCO (grefs(unc).json + instances.json + COCO_train2014_*.png)",
        "parameters": {
            "num_images": {s: int(num_images[s]) for s in SPLITS}, "image_size": image_size, "seed": seed,
            "colors": {c: list(PALETTE[c]) for c in colors}, "shapes": list(shapes),
            "split_options": {s: {k: list(v) if isinstance(v, tuple) else v for k, v in split_opts[s].items()}
                              for s in SPLITS},
            "kind_weights": kind_weights, "duplicate_rate": duplicate_rate, "relation_margin_px": margin,
        },
        "files": {
            "refs": str(GREFCOCO_SUBDIR / GREFS_NAME), "instances": str(GREFCOCO_SUBDIR / "instances.json"),
            "images": str(IMAGE_SUBDIR), "labels": LABELS_NAME,
        },
        "stats": stats,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    (root / "README.txt").write_text(_readme(manifest))
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


# Written into an --hf-out folder: what marks a `datasets` folder this generator wrote, and lists its files.
HF_MANIFEST_NAME = "synthetic_hf.json"
HF_FORMAT = 1


def _folder_entries(folder: Path, flag: str) -> list[Path]:
    """Every entry under `folder`, refusing a symbolic link anywhere (nothing is replaced through one)."""
    entries = []
    for parent, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(parent, name)
            if path.is_symlink():
                raise FileExistsError(
                    f"{flag} {folder}: {path.relative_to(folder)} is a symbolic link; the generator never writes or "
                    "deletes through one: give an empty or new folder"
                )
            entries.append(path)
    return entries


def check_hf_out(folder: str | Path) -> list[Path]:
    """The files an earlier `--hf-out` run wrote in `folder`, which a new run replaces; none for an absent or empty
    folder. Any other folder is refused naming it (UsageError for a link, FileExistsError otherwise): a link, a file, or one holding a file that no
    `HF_MANIFEST_NAME` of this generator there lists (a user's own DatasetDict above all)."""
    folder = Path(folder)
    refuse_link(folder, "--hf-out")
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise FileExistsError(f"--hf-out {folder} is a file, not a folder; give an empty or new folder")
    files = [path for path in _folder_entries(folder, "--hf-out") if not path.is_dir()]
    if not files:
        return []
    manifest = folder / HF_MANIFEST_NAME
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        listed = record["files"] if (record["written_by"], record["format"]) == (GENERATOR, HF_FORMAT) else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise FileExistsError(
            f"--hf-out {folder} holds files this generator did not write (no {HF_MANIFEST_NAME} of "
            f"{GENERATOR} there); refusing to replace them: give an empty or new folder"
        )
    ours = {folder / name for name in listed} | {manifest}
    left = sorted(str(path.relative_to(folder)) for path in files if path not in ours)
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise FileExistsError(
            f"--hf-out {folder} holds files this generator did not write ({shown}); refusing to replace them: give "
            "an empty or new folder"
        )
    return files


def write_hf_out(dataset_dir, specs: list[str], folder: str | Path) -> None:
    """Save `specs` of the tree as a DatasetDict in `folder`, with its `HF_MANIFEST_NAME`, replacing only what
    `check_hf_out` allows. Saved into a new folder beside it first, so a failed save leaves the earlier one whole."""
    from .hf_datasets import tree_to_hf

    folder = Path(os.path.abspath(folder))  # "." and "x/.." have a real name and parent
    check_hf_out(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fresh = scratch / "hf"
        tree_to_hf(dataset_dir, specs, fresh)
        names = sorted(str(path.relative_to(fresh)) for path in fresh.rglob("*") if path.is_file())
        record = {
            "written_by": GENERATOR,
            "format": HF_FORMAT,
            "tree": str(dataset_dir),
            "specs": list(specs),
            "files": names,
        }
        (fresh / HF_MANIFEST_NAME).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        for path in check_hf_out(folder):  # checked again: the folder may have changed during the save
            path.unlink()
        if folder.exists():
            for path in sorted(_folder_entries(folder, "--hf-out"), key=lambda p: len(p.parts), reverse=True):
                path.rmdir()
            folder.rmdir()
        os.replace(fresh, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _readme(manifest: dict) -> str:
    p = manifest["parameters"]
    lines = [
        "Synthetic generalized referring segmentation task in the gRefCOCO layout, written by",
        "`python -m gsva_hf.data.synthetic`. Regenerate rather than edit: the same arguments give identical bytes.",
        "",
        f"  {manifest['files']['refs']}       refs: ann_id list, [-1] = no target; one sentence per ref",
        f"  {manifest['files']['instances']}  COCO images/annotations (polygons); category = shape",
        f"  {manifest['files']['images']}/   {FILE_PATTERN.replace('%012d', '<image_id:012d>')} (lossless)",
        f"  {MANIFEST_NAME}  parameters and statistics;  {LABELS_NAME}  colour of each annotation, kind of each ref",
        "",
        f"image size {p['image_size']}, seed {p['seed']}; colours {', '.join(p['colors'])}; "
        f"shapes {', '.join(p['shapes'])}",
        "relations (left of / right of / above / below) compare bbox centres; every candidate sits at least "
        f"{p['relation_margin_px']} px",
        "from the anchor along the axis. A phrase matching several instances refers to all of them (plural noun).",
        "",
        "split   images  objects  refs  no-target  hard-neg share  multi-target  single/attribute/multi/relational",
    ]
    for split, s in manifest["stats"].items():
        k = s["kinds"]
        lines.append(
            f"{split:<7} {s['images']:>6} {s['objects']:>8} {s['refs']:>5} {s['no_target_refs']:>10} "
            f"{s.get('hard_negative_share', 0):>15.2f} {s['multi_target_refs']:>13}  "
            f"{k['single']}/{k['attribute']}/{k['multi']}/{k['relational']}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = CommandParser(
        prog="python -m gsva_hf.data.synthetic",
        description="Write the synthetic coloured-shapes GRES task as gRefCOCO files under OUT/refer_seg/, "
        "so `grefcoco|unc|<split>` loads it with the ordinary reader (pass OUT as the dataset dir).",
    )
    parser.add_argument("--out", required=True, help="dataset dir (GSVA data root) to write into")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_NUM_IMAGES[split], metavar="N",
                            help=f"images in the {split} split")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed; same arguments give identical files")
    parser.add_argument("--colors", default=",".join(DEFAULT_COLORS),
                        help=f"comma-separated colours from {','.join(PALETTE)}")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated shapes from {','.join(ALL_SHAPES)}")
    parser.add_argument("--eval-hard-negative-rate", type=float, default=SPLIT_DEFAULTS["val"]["hard_negative_rate"],
                        help="share of absent targets in val/testA/testB that share a colour or shape with a present "
                        "object")
    parser.add_argument("--train-hard-negative-rate", type=float,
                        default=SPLIT_DEFAULTS["train"]["hard_negative_rate"],
                        help="the same share for train")
    parser.add_argument("--hf-out", metavar="DIR",
                        help="also save the written splits as a `datasets` DatasetDict in DIR (read it with "
                        "'hf:DIR|<split>'; see gsva_hf.data.hf_datasets)")
    args = parser.parse_args(argv)
    split_options = {s: {"hard_negative_rate": args.eval_hard_negative_rate} for s in ("val", "testA", "testB")}
    split_options["train"] = {"hard_negative_rate": args.train_hard_negative_rate}
    try:
        if args.hf_out:  # refused before the tree is written
            tree, hf = Path(args.out).resolve(), Path(args.hf_out).resolve()
            if tree == hf or tree in hf.parents or hf in tree.parents:
                raise ValueError(f"--hf-out {args.hf_out} and --out {args.out} overlap; give two separate folders")
            check_hf_out(args.hf_out)
        manifest = write_synthetic_grefcoco(
            args.out,
            num_images={s: getattr(args, s) for s in SPLITS},
            image_size=args.image_size,
            seed=args.seed,
            colors=[c.strip() for c in args.colors.split(",") if c.strip()],
            shapes=[s.strip() for s in args.shapes.split(",") if s.strip()],
            split_options=split_options,
        )
    except (OSError, ValueError) as error:  # a refused or unwritable --out, a bad option: one line, no traceback
        if args.debug:
            raise
        parser.error(_one_line(error, "--out", args.out))
    print(_readme(manifest), end="")
    print(f"wrote {Path(args.out) / GREFCOCO_SUBDIR} and {Path(args.out) / IMAGE_SUBDIR} in {manifest['seconds']} s")
    if args.hf_out:
        written = [f"grefcoco|unc|{split}" for split in SPLITS if getattr(args, split) > 0]
        try:
            write_hf_out(args.out, written, args.hf_out)
        except (OSError, ValueError) as error:
            if args.debug:
                raise
            parser.error(_one_line(error, "--hf-out", args.hf_out))
        print(f"wrote the datasets form of {', '.join(written)} to {args.hf_out}")


def _one_line(error: Exception, flag: str, folder) -> str:
    """The error as one line naming the flag: Python's own OSErrors (a folder that cannot be created) say where."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{flag} {folder}: cannot write {error.filename} ({error.strerror or error})"
    return str(error)


if __name__ == "__main__":
    main()
