"""ReasonSeg (LISA): reasoning queries with one labelme-polygon mask per image.

Layout under `dataset_dir`: `reason_seg/ReasonSeg/{train,val,test}/<stem>.jpg` next to `<stem>.json`
(`shapes` of `{label, points}`, `text` a list of queries, `is_sentence`), plus
`reason_seg/ReasonSeg/explanatory/train.json` (a list of `{image, query, outputs}`).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from processing_gsva import SEG_TOKEN, AnswerText

from .images import open_dataset_image
from .prompts import ANSWER_LIST, EXPLANATORY_QUESTION_LIST, LONG_QUESTION_LIST, SHORT_QUESTION_LIST
from .sample import Sample
from .seeding import check_index, index_rng

IGNORE_VALUE = 255
TARGET_VALUE = 1
IGNORE_MODES = ("gsva", "lisa")


# ----------------------------------------------------------------------------------------------------------------
# File readers
# ----------------------------------------------------------------------------------------------------------------
def read_json_file(path) -> object:
    """Parse a JSON file, decoding UTF-8 first and cp1252 second (some ReasonSeg files are cp1252)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise FileNotFoundError(f"cannot read {str(path)!r}: {error}") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as error:
            raise ValueError(f"{str(path)!r} is neither UTF-8 nor cp1252 text: {error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error


def read_reason_seg_json(path) -> dict:
    """Read one ReasonSeg annotation and check the three keys the reader uses."""
    data = read_json_file(path)
    where = f"ReasonSeg annotation {str(path)!r}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key in ("shapes", "text", "is_sentence"):
        if key not in data:
            raise ValueError(f"{where}: missing key {key!r}")
    shapes, texts, is_sentence = data["shapes"], data["text"], data["is_sentence"]
    if not isinstance(shapes, list):
        raise ValueError(f"{where}: 'shapes' must be a list, got {type(shapes).__name__}")
    if isinstance(texts, str):
        raise ValueError(f"{where}: 'text' must be a list of queries, got a single string")
    if not isinstance(texts, list) or not texts:
        raise ValueError(f"{where}: 'text' must be a non-empty list of queries")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: text[{index}] must be a non-empty string, got {text!r}")
    if not isinstance(is_sentence, bool):
        raise ValueError(f"{where}: 'is_sentence' must be true or false, got {is_sentence!r}")
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or "label" not in shape or "points" not in shape:
            raise ValueError(f"{where}: shapes[{index}] must be an object with 'label' and 'points'")
        if not isinstance(shape["label"], str):
            raise ValueError(f"{where}: shapes[{index}] label must be a string, got {shape['label']!r}")
    return data


def _polygon_points(shape: dict, where: str) -> list[tuple[int, int]]:
    """Vertices as integers truncated toward zero (GSVA casts the float points to int32)."""
    try:
        points = np.asarray(shape["points"], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: points are not a list of [x, y] numbers: {error}") from error
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{where}: points must be a list of [x, y] pairs, got shape {points.shape}")
    if points.shape[0] < 3:
        raise ValueError(f"{where}: a polygon needs at least 3 points, got {points.shape[0]}")
    if not np.isfinite(points).all():
        raise ValueError(f"{where}: points contain NaN or infinity")
    return [(int(x), int(y)) for x, y in points.astype(np.int32)]


def _draw_polygon(canvas: Image.Image, points: list[tuple[int, int]], value: int) -> None:
    """Fill a polygon including its 1-pixel outline.

    GSVA draws `cv2.polylines(thickness=1)` then `cv2.fillPoly`; PIL's `polygon(fill=, outline=)` covers the
    same closed region up to single boundary pixels where the two rasterisers round differently.
    """
    ImageDraw.Draw(canvas).polygon(points, fill=value, outline=value)


def reason_seg_label(annotation: dict, height: int, width: int, json_path="") -> np.ndarray:
    """The HxW uint8 label map of one ReasonSeg image: 0 background, 1 target, 255 ignore.

    "flag" shapes (deprecated annotations) are skipped. The others are sorted by their rasterised area,
    largest first, and drawn in that order, so a small polygon inside a large one stays visible; equal areas
    keep GSVA's order (reversed ascending argsort: the later shape first). Labels containing "ignore" draw 255.
    """
    polygons = []
    for index, shape in enumerate(annotation["shapes"]):
        label = shape["label"]
        if label.lower() == "flag":
            continue
        where = f"ReasonSeg annotation {str(json_path)!r}, shapes[{index}] (label {label!r})"
        points = _polygon_points(shape, where)
        scratch = Image.new("L", (width, height), 0)
        _draw_polygon(scratch, points, 1)
        area = int(np.asarray(scratch, dtype=np.uint8).sum())
        value = IGNORE_VALUE if "ignore" in label.lower() else TARGET_VALUE
        polygons.append((area, index, points, value))
    canvas = Image.new("L", (width, height), 0)
    for _, _, points, value in sorted(polygons, key=lambda item: (item[0], item[1]), reverse=True):
        _draw_polygon(canvas, points, value)
    return np.asarray(canvas, dtype=np.uint8).copy()


def parse_reason_seg_spec(spec: str) -> tuple[str, list[str]]:
    """`"ReasonSeg|train"` or `"ReasonSeg|train_val"` → ("ReasonSeg", ["train", "val"]) (GSVA's syntax)."""
    parts = spec.split("|")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(f"ReasonSeg spec must look like 'ReasonSeg|train' or 'ReasonSeg|train_val', got {spec!r}")
    splits = parts[1].split("_")
    if any(not split for split in splits):
        raise ValueError(f"ReasonSeg spec {spec!r} has an empty split name")
    return parts[0], splits


def list_reason_seg_images(dataset_dir, name: str, splits: list[str]) -> list[Path]:
    """All `<split>/*.jpg` of the named ReasonSeg folder, sorted (GSVA's glob order is not deterministic)."""
    images = []
    for split in splits:
        folder = Path(dataset_dir) / "reason_seg" / name / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ReasonSeg split folder {str(folder)!r} does not exist")
        found = sorted(folder.glob("*.jpg"))
        if not found:
            raise ValueError(f"ReasonSeg split folder {str(folder)!r} holds no .jpg images")
        images.extend(found)
    return images


def read_explanations(path) -> dict[str, str]:
    """`explanatory/train.json` → {image file name: explanation text}."""
    items = read_json_file(path)
    if not isinstance(items, list):
        raise ValueError(f"ReasonSeg explanations {str(path)!r}: expected a JSON list, got {type(items).__name__}")
    explanations = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(
            item.get("outputs"), str
        ):
            raise ValueError(
                f"ReasonSeg explanations {str(path)!r}, entry {index}: needs string fields 'image' and 'outputs'"
            )
        explanations[item["image"]] = item["outputs"]
    return explanations


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
class ReasonSegDataset(torch.utils.data.Dataset):
    """ReasonSeg training samples with GSVA's prompts.

    GSVA turns one image into up to `num_classes_per_sample` conversations (one per sampled query, all with the
    same GT mask). A `Sample` holds one conversation, so `get_group(i)` returns that whole list and
    `dataset[i]` returns its first element only: the query distribution is the same (a uniform query), but the
    per-image multiplicity of GSVA's batches is lost. The training target is `label == 1`: "ignore" pixels are
    background, as in GSVA.

    Explanatory mode (`explanatory >= 0`, GSVA default 0.1; `-1` or None turns it off, as GSVA's `-1` does): for
    images listed in `explanatory/train.json`, one choice shared by all queries of the image: with probability
    `explanatory` the question is the bare query and the answer is the explanation (no `[SEG]`, no mask); else
    uniformly the plain answer or "query + explanatory question" → "answer + explanation". Note that
    `explanatory=0` still adds explanations to half of those images, exactly like GSVA.

    `samples_per_epoch=None` iterates images by index (GSVA's `--no_sampling`); an int draws a uniform image per
    index. Either way `dataset[i]` depends only on (seed, i).
    """

    source = "reason_seg"

    def __init__(
        self,
        dataset_dir,
        splits: str | list[str] = "train",
        num_classes_per_sample: int = 3,
        explanatory: float | None = 0.1,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        dataset_name: str = "ReasonSeg",
    ):
        if num_classes_per_sample < 1:
            raise ValueError(f"num_classes_per_sample must be at least 1, got {num_classes_per_sample}")
        if explanatory is not None and explanatory != -1 and not 0.0 <= explanatory <= 1.0:
            raise ValueError(f"explanatory must be a probability in [0, 1], or -1/None to disable, got {explanatory}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive or None, got {samples_per_epoch}")
        self.dataset_dir = Path(dataset_dir)
        self.splits = splits.split("_") if isinstance(splits, str) else list(splits)
        self.dataset_name = dataset_name
        self.num_classes_per_sample = int(num_classes_per_sample)
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.images = list_reason_seg_images(self.dataset_dir, dataset_name, self.splits)
        self.explanatory = None if explanatory is None or explanatory == -1 else float(explanatory)
        self.explanations: dict[str, str] = {}
        if self.explanatory is not None:
            path = self.dataset_dir / "reason_seg" / dataset_name / "explanatory" / "train.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"explanatory={explanatory} needs {str(path)!r}; pass explanatory=-1 to train without it"
                )
            self.explanations = read_explanations(path)

    @classmethod
    def from_spec(cls, dataset_dir, spec: str = "ReasonSeg|train", **kwargs) -> "ReasonSegDataset":
        """Build from GSVA's `--reason_seg_data` syntax."""
        name, splits = parse_reason_seg_spec(spec)
        return cls(dataset_dir, splits=splits, dataset_name=name, **kwargs)

    def __len__(self) -> int:
        return len(self.images) if self.samples_per_epoch is None else self.samples_per_epoch

    def _image_index(self, index: int, rng) -> int:
        if self.samples_per_epoch is None:
            return index
        return rng.randrange(len(self.images))

    def get_group(self, index: int) -> list[Sample]:
        """All conversations GSVA would build for item `index` (one `Sample` per sampled query)."""
        index = check_index(index, len(self))
        rng = index_rng(self.seed, index, self.source)
        image_path = self.images[self._image_index(index, rng)]
        json_path = image_path.with_suffix(".json")
        image = open_dataset_image(image_path)
        annotation = read_reason_seg_json(json_path)
        label = reason_seg_label(annotation, image.height, image.width, json_path)
        target = label == TARGET_VALUE
        texts = annotation["text"]
        chosen = rng.sample(range(len(texts)), min(self.num_classes_per_sample, len(texts)))
        explanation = self.explanations.get(image_path.name)
        choice = 0
        if explanation is not None:
            choice = 2 if rng.random() < self.explanatory else rng.randrange(2)
        samples = []
        for text_index in chosen:
            text = texts[text_index]
            if annotation["is_sentence"]:
                question = rng.choice(LONG_QUESTION_LIST).format(sent=text)
            else:
                question = rng.choice(SHORT_QUESTION_LIST).format(class_name=text.lower())
            masks, targets = target[None].copy(), [text]
            if choice == 0:
                answer = rng.choice(ANSWER_LIST)
            elif choice == 1:
                answer = AnswerText.join([(rng.choice(ANSWER_LIST) + " ", False), (explanation, True)])
                question = text + " " + rng.choice(EXPLANATORY_QUESTION_LIST)
            else:
                question, answer = text, AnswerText.join([(explanation, True)])
                masks, targets = np.zeros((0, image.height, image.width), dtype=bool), []
            samples.append(
                Sample(
                    image=image,
                    rounds=[(question, answer)],
                    masks=masks,
                    targets=targets,
                    rejected=[False] * len(targets),
                    image_path=str(image_path),
                    source=self.source,
                    meta={
                        "dataset": self.dataset_name,
                        "split": image_path.parent.name,
                        "index": index,
                        "image": image_path.name,
                        "text_index": text_index,
                        "explanatory_choice": choice,
                    },
                )
            )
        return samples

    def __getitem__(self, index: int) -> Sample:
        return self.get_group(index)[0]


@dataclass
class ReasonSegValSample(Sample):
    """A validation `Sample` that also carries the raw label map, so a metric can treat "ignore" either way.

    label: HxW uint8, 0 background, 1 target, 255 "ignore".
    ignore_mode: "gsva" → `masks` = label != 0 (GSVA's `masks.bool()` counts ignore pixels as target, which
        reproduces its ReasonSeg numbers); "lisa" → `masks` = label == 1 and `ignore_masks` marks the 255 pixels
        that LISA's metric leaves out.
    """

    label: np.ndarray | None = None
    ignore_mode: str = "gsva"

    @property
    def gt_labels(self) -> np.ndarray:
        """Uint8 `[K, H, W]` with 0/1/255: the GT for `RefSegAccumulator`, whose own ignore_mode then decides."""
        if self.label is None:
            return self.masks.astype(np.uint8)
        return np.broadcast_to(self.label, self.masks.shape).copy()

    @property
    def ignore_masks(self) -> np.ndarray:
        """Bool `[K, H, W]`: pixels the IoU must skip (none in "gsva" mode)."""
        if self.ignore_mode == "lisa" and self.label is not None:
            return np.broadcast_to(self.label == IGNORE_VALUE, self.masks.shape).copy()
        return np.zeros_like(self.masks, dtype=bool)


class ReasonSegValDataset(torch.utils.data.Dataset):
    """ReasonSeg evaluation, one item per image: the first query only, GSVA's validation prompt verbatim.

    Question: " {query} Please output segmentation mask." for sentences, " What is {query} in this image? Please
    output segmentation mask." for phrases (GSVA writes "<image>\\n" before both; the space after the newline is
    kept). Answer "[SEG]" (GSVA; LISA uses "[SEG]."). The query is stripped, not lower-cased.
    """

    source = "reason_seg_val"

    def __init__(self, dataset_dir, spec: str = "ReasonSeg|val", ignore_mode: str = "gsva"):
        if ignore_mode not in IGNORE_MODES:
            raise ValueError(f"ignore_mode must be one of {IGNORE_MODES}, got {ignore_mode!r}")
        self.dataset_dir = Path(dataset_dir)
        self.spec = spec
        self.ignore_mode = ignore_mode
        self.dataset_name, self.splits = parse_reason_seg_spec(spec)
        self.images = list_reason_seg_images(self.dataset_dir, self.dataset_name, self.splits)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ReasonSegValSample:
        index = check_index(index, len(self))
        image_path = self.images[index]
        json_path = image_path.with_suffix(".json")
        image = open_dataset_image(image_path)
        annotation = read_reason_seg_json(json_path)
        label = reason_seg_label(annotation, image.height, image.width, json_path)
        text = annotation["text"][0].strip()
        if annotation["is_sentence"]:
            question = " " + LONG_QUESTION_LIST[1].format(sent=text)
        else:
            question = " " + SHORT_QUESTION_LIST[3].format(class_name=text)
        masks = (label != 0) if self.ignore_mode == "gsva" else (label == TARGET_VALUE)
        return ReasonSegValSample(
            image=image,
            rounds=[(question, SEG_TOKEN)],
            masks=masks[None],
            targets=[text],
            rejected=[False],
            image_path=str(image_path),
            source=self.source,
            meta={"dataset": self.dataset_name, "split": image_path.parent.name, "image": image_path.name},
            label=label,
            ignore_mode=self.ignore_mode,
        )

