"""Semantic and part segmentation sets turned into GSVA multi-target samples.

Label-map sets (a class id per pixel): ADE20K (`ade20k/images/training/*.jpg`, `ade20k/annotations/training/*.png`),
COCO-Stuff (`cocostuff/train2017/*.png` with images `coco/train2017/*.jpg`) and Mapillary Vistas v2.0
(`mapillary/training/v2.0/labels/*.png`, `mapillary/training/images/*.jpg`, classes from `mapillary/config_v2.0.json`).
Part sets in COCO format: PACO-LVIS (`vlpart/paco/annotations/paco_lvis_v1_train.json`, images `coco/<file_name>`)
and PASCAL-Part (`vlpart/pascal_part/train.json`, images `vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>`).

Class lists shipped in `literals/`: the 150 ADE20K SceneParsing names in their label order, and the 182 COCO-Stuff
names ("N: name", first line "0: unlabeled") in label order. Both can be replaced by a path or a list.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from .guards import AnnotationError, check_polygon, check_rle_counts, safe_join
from .images import check_claimed_size, image_header_size, open_dataset_image
from .prompts import multi_target_answer, multi_target_question
from .reason_seg import read_json_file
from .sample import Sample
from .seeding import check_index, index_rng
from .specs import parse_dataset_list

LITERALS = Path(__file__).resolve().parent / "literals"
ADE20K_CLASSES_FILE = LITERALS / "ade20k_classes.json"
COCOSTUFF_CLASSES_FILE = LITERALS / "cocostuff_classes.txt"
SEM_SEG_DATASETS = ("ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part")
DEFAULT_SEM_SEG_DATA = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"
ANSWER_SEPARATOR = ","  # GSVA joins sem_seg answer parts with "," (no space), unlike refer_seg's ", "
IGNORE = -1  # class id of pixels that no target may contain


# ----------------------------------------------------------------------------------------------------------------
# Class lists
# ----------------------------------------------------------------------------------------------------------------
def load_ade20k_classes(source=None) -> list[str]:
    """ADE20K's 150 class names in label order (pixel value v ↦ name v-1), from a JSON list file or a list."""
    if source is None:
        source = ADE20K_CLASSES_FILE
    if isinstance(source, (list, tuple)):
        names, where = list(source), "the ade20k class list"
    else:
        names, where = read_json_file(source), f"ADE20K class file {str(source)!r}"
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{where} must be a list of non-empty strings")
    if len(names) != 150:
        raise ValueError(f"{where} must hold the 150 ADE20K classes, got {len(names)}")
    return names


def load_cocostuff_classes(source=None) -> list[str]:
    """COCO-Stuff's 182 names (pixel value v ↦ name v) from "N: name" lines; the first ("0: unlabeled") is skipped."""
    if source is None:
        source = COCOSTUFF_CLASSES_FILE
    if isinstance(source, (list, tuple)):
        names = list(source)
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError("the cocostuff class list must hold non-empty strings")
        return names
    path = Path(source)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FileNotFoundError(f"cannot read COCO-Stuff class file {str(path)!r}: {error}") from error
    names = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if ": " not in line:
            raise ValueError(f"COCO-Stuff class file {str(path)!r}, line {number}: expected 'N: name', got {line!r}")
        index, name = line.strip().split(": ", 1)
        if index != str(len(names) + 1) or not name:
            raise ValueError(
                f"COCO-Stuff class file {str(path)!r}, line {number}: expected '{len(names) + 1}: name', got {line!r}"
            )
        names.append(name)
    if not names:
        raise ValueError(f"COCO-Stuff class file {str(path)!r} lists no classes after its first line")
    return names


def load_mapillary_classes(config_path) -> list[str]:
    """Mapillary's `labels[].readable`, lower-cased, in label-id order."""
    config = read_json_file(config_path)
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"Mapillary config {str(config_path)!r}: expected a non-empty 'labels' list")
    names = []
    for index, label in enumerate(labels):
        readable = label.get("readable") if isinstance(label, dict) else None
        if not isinstance(readable, str) or not readable:
            raise ValueError(f"Mapillary config {str(config_path)!r}, labels[{index}]: missing string 'readable'")
        names.append(readable.lower())
    return names


def part_category_name(name: str, where: str) -> str | tuple[str, str]:
    """"obj:part" → (obj, part), "obj" → obj, each with a trailing "_(…)" qualifier removed ("bottle_(drink)")."""
    pieces = name.strip().split(":")
    if len(pieces) > 2 or any(not piece for piece in pieces):
        raise ValueError(f"{where}: category name {name!r} is not 'object' or 'object:part'")
    pieces = [piece.split("_(")[0] for piece in pieces]
    return pieces[0] if len(pieces) == 1 else (pieces[0], pieces[1])


# ----------------------------------------------------------------------------------------------------------------
# Label-map sources (ADE20K, COCO-Stuff, Mapillary)
# ----------------------------------------------------------------------------------------------------------------
def _list_files(folder: Path, pattern: str, what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    files = sorted(folder.glob(pattern))
    if not files:
        raise ValueError(f"{what} folder {str(folder)!r} holds no {pattern} files")
    return files


def read_label_png(path) -> np.ndarray:
    """A single-channel label PNG as an int array, or an error naming the file."""
    try:
        with Image.open(path) as opened:
            if opened.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"label image {str(path)!r} has mode {opened.mode}, expected one channel (L or P)")
            return np.asarray(opened).astype(np.int64)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"cannot open label image {str(path)!r}: {error}") from error


class LabelMapSource:
    """Images with per-pixel class ids; `class_ids(k)` maps a label PNG to class indices (IGNORE where none)."""

    def __init__(self, name: str, classes: list[str], images: list[Path], labels: list[Path], offset: int,
                 ignore_values: tuple[int, ...], ignored_classes: set[int] = frozenset()):
        self.name = name
        self.classes = classes
        self.images = images
        self.labels = labels
        self.offset = offset  # class index = pixel value - offset
        self.ignore_values = ignore_values  # raw pixel values that mean "no class"
        self.ignored_classes = set(ignored_classes)

    def __len__(self) -> int:
        return len(self.images)

    def class_ids(self, index: int) -> np.ndarray:
        path = self.labels[index]
        try:
            check_claimed_size(image_header_size(path), claimed_by="its header")
        except ValueError as error:
            raise ValueError(f"{self.name} label {str(path)!r}: {error}") from error
        raw = read_label_png(path)
        ids = raw - self.offset
        ignored = np.isin(raw, self.ignore_values)
        unknown = ~ignored & ((ids < 0) | (ids >= len(self.classes)))
        if unknown.any():
            values = sorted(set(np.unique(raw[unknown]).tolist()))
            raise ValueError(
                f"{self.name} label {str(path)!r}: pixel values {values[:10]} name no class "
                f"(the list has {len(self.classes)} classes, value v means class v-{self.offset})"
            )
        if self.ignored_classes:
            ignored |= np.isin(ids, sorted(self.ignored_classes))
        ids[ignored] = IGNORE
        return ids

    def draw(self, index: int, rng, count: int):
        """(names, masks, image path, label path) for up to `count` class names present in image `index`, or None."""
        ids = self.class_ids(index)
        by_name: dict[str, list[int]] = {}
        for class_id in np.unique(ids).tolist():
            if class_id != IGNORE:
                by_name.setdefault(self.classes[class_id], []).append(class_id)
        if not by_name:
            return None
        names = rng.sample(sorted(by_name), min(count, len(by_name)))
        masks = np.stack([np.isin(ids, by_name[name]) for name in names])
        return names, masks, self.images[index], self.labels[index]


def ade20k_source(dataset_dir: Path, classes=None) -> LabelMapSource:
    """ADE20K: pixel 0 is "other" and 255 is unused, both ignored; pixel v ≥ 1 is class v-1."""
    root = dataset_dir / "ade20k"
    images = _list_files(root / "images" / "training", "*.jpg", "ADE20K image")
    labels = [root / "annotations" / "training" / (path.stem + ".png") for path in images]
    return LabelMapSource("ade20k", load_ade20k_classes(classes), images, labels, offset=1, ignore_values=(0, 255))


def cocostuff_source(dataset_dir: Path, classes=None) -> LabelMapSource:
    """COCO-Stuff: pixel v is class v, 255 unlabeled; names with "-" ("wall-brick") are ignored, as in GSVA."""
    names = load_cocostuff_classes(classes)
    labels = _list_files(dataset_dir / "cocostuff" / "train2017", "*.png", "COCO-Stuff label")
    images = [dataset_dir / "coco" / "train2017" / (path.stem + ".jpg") for path in labels]
    dashed = {index for index, name in enumerate(names) if "-" in name}
    return LabelMapSource("cocostuff", names, images, labels, offset=0, ignore_values=(255,), ignored_classes=dashed)


def mapillary_source(dataset_dir: Path) -> LabelMapSource:
    """Mapillary Vistas v2.0: pixel v is `labels[v]` of the config (its own "unlabeled" class included, as in GSVA)."""
    root = dataset_dir / "mapillary"
    names = load_mapillary_classes(root / "config_v2.0.json")
    labels = _list_files(root / "training" / "v2.0" / "labels", "*.png", "Mapillary label")
    images = [root / "training" / "images" / (path.stem + ".jpg") for path in labels]
    ignore = (255,) if len(names) <= 255 else ()
    return LabelMapSource("mapillary", names, images, labels, offset=0, ignore_values=ignore)


# ----------------------------------------------------------------------------------------------------------------
# COCO-format part sources (PACO-LVIS, PASCAL-Part)
# ----------------------------------------------------------------------------------------------------------------
def annotation_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
    """Decode one COCO `segmentation` (polygons, uncompressed or compressed RLE) to an HxW bool mask."""
    try:
        if isinstance(segmentation, list):
            if not segmentation:
                raise ValueError("empty polygon list")
            for part, polygon in enumerate(segmentation):
                if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) for v in polygon):
                    raise ValueError(f"polygon {part} is not a flat list of numbers")
                if len(polygon) < 6 or len(polygon) % 2:
                    raise ValueError(
                        f"polygon {part} has {len(polygon)} coordinates; needs an even count ≥ 6 (3 points)"
                    )
                try:
                    check_polygon(polygon, height, width)
                except AnnotationError as error:
                    raise ValueError(f"polygon {part}: {error}") from error
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            if list(segmentation["size"]) != [height, width]:
                raise ValueError(f"RLE size {segmentation['size']} differs from the image size {[height, width]}")
            counts = segmentation["counts"]
            if isinstance(counts, str):
                if not counts.isascii():
                    raise ValueError("compressed RLE 'counts' is not ASCII")
                counts = counts.encode("ascii")
            if not isinstance(counts, (list, bytes)):
                raise ValueError(f"RLE 'counts' must be a list or a string, got {type(counts).__name__}")
            check_rle_counts(counts, height, width)
            if isinstance(counts, list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": [height, width], "counts": counts}
        else:
            raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
        decoded = mask_utils.decode(rle)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error
    return decoded.astype(bool)


class CocoPartSource:
    """A COCO-format part set: one target per sampled annotation, its name from the category."""

    def __init__(self, name: str, json_path: Path, image_root: Path):
        self.name = name
        self.json_path = json_path
        self.image_root = image_root
        data = read_json_file(json_path)
        where = f"{name} annotations {str(json_path)!r}"
        keys = ("images", "annotations", "categories")
        if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in keys):
            raise ValueError(f"{where}: expected a COCO object with 'images', 'annotations' and 'categories' lists")
        self.categories = {}
        for index, category in enumerate(data["categories"]):
            if not isinstance(category, dict) or "id" not in category or not isinstance(category.get("name"), str):
                raise ValueError(f"{where}, categories[{index}]: needs 'id' and a string 'name'")
            category_where = f"{where}, category {category['id']}"
            self.categories[category["id"]] = part_category_name(category["name"], category_where)
        self.image_infos = []
        by_id = {}
        for index, info in enumerate(data["images"]):
            if not isinstance(info, dict) or not all(k in info for k in ("id", "file_name", "height", "width")):
                raise ValueError(f"{where}, images[{index}]: needs 'id', 'file_name', 'height' and 'width'")
            by_id[info["id"]] = len(self.image_infos)
            self.image_infos.append(info)
        self.annotations: list[list[dict]] = [[] for _ in self.image_infos]
        for index, ann in enumerate(data["annotations"]):
            ann_keys = ("id", "image_id", "category_id", "segmentation")
            if not isinstance(ann, dict) or not all(key in ann for key in ann_keys):
                raise ValueError(
                    f"{where}, annotations[{index}]: needs 'id', 'image_id', 'category_id' and 'segmentation'"
                )
            if ann["category_id"] not in self.categories:
                raise ValueError(f"{where}, annotation {ann['id']}: unknown category_id {ann['category_id']}")
            if ann["image_id"] not in by_id:
                raise ValueError(f"{where}, annotation {ann['id']}: unknown image_id {ann['image_id']}")
            self.annotations[by_id[ann["image_id"]]].append(ann)

    def __len__(self) -> int:
        return len(self.image_infos)

    def image_path(self, info: dict) -> Path:
        try:
            return Path(safe_join(self.image_root, info["file_name"]))
        except AnnotationError as error:
            raise ValueError(f"{self.name} annotations {str(self.json_path)!r}, image {info['id']!r}: {error}") from error

    def draw(self, index: int, rng, count: int):
        """(names, masks, image path, json path) for up to `count` annotations of image `index`, or None if it has none.

        Annotations, not categories, are sampled (GSVA), so one name can come twice with different instances.
        An "obj:part" category reads "obj part" or "the part of the obj" with probability 1/2 each.
        """
        anns = self.annotations[index]
        if not anns:
            return None
        info = self.image_infos[index]
        height, width = int(info["height"]), int(info["width"])
        try:
            # A missing image file is reported when it is opened; its claimed size is still bounded here.
            image_path = self.image_path(info)
            check_claimed_size((height, width), image_path if image_path.exists() else None, claimed_by="the annotation file")
        except ValueError as error:
            raise ValueError(f"{self.name} annotations {str(self.json_path)!r}, image {info['id']!r}: {error}") from error
        names, masks = [], []
        for ann in rng.sample(anns, min(count, len(anns))):
            category = self.categories[ann["category_id"]]
            if isinstance(category, tuple):
                obj, part = category
                names.append(f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}")
            else:
                names.append(category)
            where = f"{self.name} annotations {str(self.json_path)!r}, annotation {ann['id']}"
            masks.append(annotation_mask(ann["segmentation"], height, width, where))
        return names, np.stack(masks), self.image_path(info), self.json_path


def paco_lvis_source(dataset_dir: Path) -> CocoPartSource:
    path = dataset_dir / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json"
    return CocoPartSource("paco_lvis", path, dataset_dir / "coco")


def pascal_part_source(dataset_dir: Path) -> CocoPartSource:
    root = dataset_dir / "vlpart" / "pascal_part"
    return CocoPartSource("pascal_part", root / "train.json", root / "VOCdevkit" / "VOC2010" / "JPEGImages")


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------
class SemSegDataset(torch.utils.data.Dataset):
    """Semantic/part segmentation as GSVA multi-target conversations.

    Each item: a sub-dataset chosen uniformly, an image chosen uniformly, then up to `num_classes_per_sample`
    classes present in it (label-map sets; the classes are distinct names) or annotations (part sets), sampled
    without replacement. Question: a `SHORT_QUESTION_LIST_MODE4` template over the lower-cased names joined by
    ", "; answer: a multi-target answer with parts joined by "," (GSVA's sem_seg quirk). Never `[REJ]`: every
    target is present. Pixels of ignored classes are simply outside every mask.

    An image with no usable class is replaced by another image of the same sub-dataset drawn from the same
    (seed, index) generator, as GSVA redraws; `max_redraws` bounds this. `samples_per_epoch=None` iterates the
    images of all listed sub-datasets in order (GSVA's `--no_sampling`, which allows a single sub-dataset).

    Deviation: when several label ids share a name, the mask is their union (GSVA takes the first id's pixels).
    """

    def __init__(
        self,
        dataset_dir,
        datasets: str | list[str] = DEFAULT_SEM_SEG_DATA,
        num_classes_per_sample: int = 3,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        ade20k_classes=None,
        cocostuff_classes=None,
        max_redraws: int = 100,
    ):
        if num_classes_per_sample < 1:
            raise ValueError(f"num_classes_per_sample must be at least 1, got {num_classes_per_sample}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive or None, got {samples_per_epoch}")
        self.dataset_dir = Path(dataset_dir)
        self.names = parse_dataset_list(datasets, SEM_SEG_DATASETS, "sem_seg dataset")
        self.num_classes_per_sample = int(num_classes_per_sample)
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.max_redraws = int(max_redraws)
        builders = {
            "ade20k": lambda: ade20k_source(self.dataset_dir, ade20k_classes),
            "cocostuff": lambda: cocostuff_source(self.dataset_dir, cocostuff_classes),
            "mapillary": lambda: mapillary_source(self.dataset_dir),
            "paco_lvis": lambda: paco_lvis_source(self.dataset_dir),
            "pascal_part": lambda: pascal_part_source(self.dataset_dir),
        }
        self.sources = [builders[name]() for name in self.names]
        for name, source in zip(self.names, self.sources):
            if len(source) == 0:
                raise ValueError(f"sem_seg dataset {name!r} under {str(self.dataset_dir)!r} has no images")
        self._starts = np.cumsum([0] + [len(source) for source in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.samples_per_epoch is None else self.samples_per_epoch

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        rng = index_rng(self.seed, index, "sem_seg")
        if self.samples_per_epoch is None:
            which = int(np.searchsorted(self._starts, index, side="right")) - 1
            image_index = index - int(self._starts[which])
        else:
            which = rng.randrange(len(self.sources))
            image_index = rng.randrange(len(self.sources[which]))
        source = self.sources[which]
        drawn = source.draw(image_index, rng, self.num_classes_per_sample)
        for _ in range(self.max_redraws):
            if drawn is not None:
                break
            image_index = rng.randrange(len(source))
            drawn = source.draw(image_index, rng, self.num_classes_per_sample)
        if drawn is None:
            raise RuntimeError(
                f"sem_seg dataset {source.name!r}: {self.max_redraws + 1} images in a row had no usable class "
                f"(item {index}); check its labels"
            )
        names, masks, image_path, label_path = drawn
        image = open_dataset_image(image_path)
        if masks.shape[1:] != (image.height, image.width):
            raise ValueError(
                f"{source.name}: labels {str(label_path)!r} give masks of size {masks.shape[1:]} but image "
                f"{str(image_path)!r} is {(image.height, image.width)}"
            )
        question = multi_target_question(names, rng)
        answer = multi_target_answer(names, [False] * len(names), rng, separator=ANSWER_SEPARATOR)
        return Sample(
            image=image,
            rounds=[(question, answer)],
            masks=masks,
            targets=names,
            rejected=[False] * len(names),
            image_path=str(image_path),
            source=f"sem_seg/{source.name}",
            meta={"dataset": source.name, "index": index, "image_index": image_index, "annotation": str(label_path)},
        )


__all__ = [
    "SemSegDataset",
    "load_ade20k_classes",
    "load_cocostuff_classes",
    "load_mapillary_classes",
    "annotation_mask",
    "part_category_name",
]
