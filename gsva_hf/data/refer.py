"""Readers for GSVA's `refer_seg/` tree: RefCOCO, RefCOCO+, RefCOCOg, RefCLEF and gRefCOCO.

Layout (GSVA `--dataset_dir`):

    refer_seg/<dataset>/refs(<splitBy>).p      RefCOCO family: pickled list of refs, one `ann_id` per ref
    refer_seg/grefcoco/grefs(unc).p|.json      gRefCOCO: `ann_id` is a list, `[-1]` means "no target"
    refer_seg/<dataset>/instances.json         COCO images / annotations the refs point into
    refer_seg/images/mscoco/images/train2014/  images of refcoco, refcoco+, refcocog and grefcoco
    refer_seg/images/saiapr_tc-12/             images of refclef

One class, `ReferData`, reads all five: the files are validated and indexed once, when it is built, so that a
broken entry fails at start-up with its file and entry named instead of in the middle of a training run: polygon
coordinates, RLE strings and image file names are checked then (`guards`), before pycocotools sees them. Masks
are decoded on demand. Pickles are read with `safe_pickle` (they never run code, and their size stays bounded).
"""

import json
import logging
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from .guards import AnnotationError, check_polygon, check_rle_counts, safe_join
from .images import check_claimed_size, open_dataset_image
from .safe_pickle import load_plain

logger = logging.getLogger(__name__)

COCO_IMAGE_DIR = os.path.join("images", "mscoco", "images", "train2014")
CLEF_IMAGE_DIR = os.path.join("images", "saiapr_tc-12")
# pycocotools' decode passes copy=False to numpy 2; harmless, and it would fire once per decoded mask.
_PYCOCOTOOLS_NUMPY2_WARNING = r"__array__ implementation doesn't accept a copy keyword"


class ReferDataError(ValueError):
    """A refer_seg file is malformed or inconsistent; the message names the file and the entry."""


@dataclass(frozen=True)
class DatasetLayout:
    """Where a refer dataset keeps its images, which splitBy values exist, and whether refs are generalized."""

    split_bys: tuple[str, ...]
    image_dir: str
    generalized: bool = False


LAYOUTS = {
    "refcoco": DatasetLayout(("unc", "google"), COCO_IMAGE_DIR),
    "refcoco+": DatasetLayout(("unc",), COCO_IMAGE_DIR),
    "refcocog": DatasetLayout(("umd", "google"), COCO_IMAGE_DIR),
    "refclef": DatasetLayout(("unc", "berkeley"), CLEF_IMAGE_DIR),
    "grefcoco": DatasetLayout(("unc",), COCO_IMAGE_DIR, generalized=True),
}


def gsva_split_by(dataset: str) -> str:
    """The splitBy GSVA always uses, whatever a spec says: umd for refcocog, unc for the rest."""
    return "umd" if dataset == "refcocog" else "unc"


@dataclass(frozen=True)
class RefSentence:
    sent: str
    sent_id: int | None
    raw: str | None


@dataclass(frozen=True)
class Ref:
    """One referring entry. `ann_ids` is empty for a gRefCOCO no-target ref (`ann_id == [-1]`)."""

    ref_id: int
    image_id: int
    split: str
    ann_ids: tuple[int, ...]
    sentences: tuple[RefSentence, ...]

    @property
    def no_target(self) -> bool:
        return not self.ann_ids


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    height: int
    width: int
    path: str


@dataclass(frozen=True)
class _Segmentation:
    """The usable parts of one annotation: polygons (already filtered) and RLE dicts."""

    polygons: tuple
    rles: tuple


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json(path: str, what: str):
    """Parse a JSON file; a missing file or bad JSON raises naming the file (and line/column)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{what} not found: {path}") from error
    except json.JSONDecodeError as error:
        raise ReferDataError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise ReferDataError(f"{path}: not UTF-8 text ({error})") from error


def open_image(path) -> Image.Image:
    """Open an image as RGB pixels as stored (no EXIF rotation: COCO annotations are on the stored pixels); see
    `images.open_dataset_image`."""
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return open_dataset_image(path)
    except ValueError as error:
        raise ReferDataError(str(error)) from error


class ReferData:
    """Validated, indexed contents of one refer dataset (refs + instances.json + image paths).

    refer_seg_dir: the `refer_seg` folder. dataset: refcoco, refcoco+, refcocog, refclef or grefcoco.
    split_by: defaults to GSVA's choice (`gsva_split_by`).
    skip_crowd: leave `iscrowd=1` annotations out of the masks (ReLA's and the official G_REFER's choice).
        By default they are decoded into the target mask, as GSVA's own readers do.
    """

    def __init__(self, refer_seg_dir, dataset: str, split_by: str | None = None, skip_crowd: bool = False):
        if dataset not in LAYOUTS:
            raise ValueError(f"unknown refer dataset {dataset!r}; known: {', '.join(sorted(LAYOUTS))}")
        layout = LAYOUTS[dataset]
        split_by = split_by or gsva_split_by(dataset)
        if split_by not in layout.split_bys:
            raise ValueError(f"{dataset} has no splitBy {split_by!r}; it has {', '.join(layout.split_bys)}")
        self.name = dataset
        self.split_by = split_by
        self.generalized = layout.generalized
        self.skip_crowd = bool(skip_crowd)
        self.refer_seg_dir = os.fspath(refer_seg_dir)
        folder = os.path.join(self.refer_seg_dir, dataset)
        self.refs_path = self._refs_file(folder, dataset, split_by, layout.generalized)
        self.instances_path = os.path.join(folder, "instances.json")
        self.image_dir = os.path.join(self.refer_seg_dir, layout.image_dir)

        raw_refs = self._read_refs()
        instances = read_json(self.instances_path, f"{dataset} instances.json")
        self.images, self.annotations = self._index_instances(instances)
        self.refs = [self._parse_ref(entry, index) for index, entry in enumerate(raw_refs)]
        self.dropped_polygons: list[tuple[int, int, int]] = []
        self.skipped_crowd: list[int] = []
        self._segmentations: dict[int, _Segmentation | None] = {}
        self._size_checked: set[int] = set()
        self._check_refs()
        self._index_refs()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _refs_file(folder: str, dataset: str, split_by: str, generalized: bool) -> str:
        """gRefCOCO prefers `grefs(<splitBy>).p` and falls back to `.json`, as the official G_REFER does."""
        if not generalized:
            return os.path.join(folder, f"refs({split_by}).p")
        candidates = [os.path.join(folder, f"grefs({split_by}).{ext}") for ext in ("p", "json")]
        for candidate in candidates:
            if os.path.exists(candidate):
                return candidate
        raise FileNotFoundError(f"{dataset} refs not found: neither {candidates[0]} nor {candidates[1]} exists")

    def _read_refs(self) -> list:
        if self.refs_path.endswith(".json"):
            refs = read_json(self.refs_path, f"{self.name} refs")
        else:
            try:
                refs = load_plain(self.refs_path)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{self.name} refs not found: {self.refs_path}") from error
        if not isinstance(refs, list):
            raise ReferDataError(f"{self.refs_path}: expected a list of refs, got {type(refs).__name__}")
        return refs

    def _index_instances(self, instances) -> tuple[dict[int, ImageInfo], dict[int, dict]]:
        path = self.instances_path
        if not isinstance(instances, dict):
            raise ReferDataError(f"{path}: expected a COCO dict, got {type(instances).__name__}")
        for key in ("images", "annotations"):
            if not isinstance(instances.get(key), list):
                raise ReferDataError(f"{path}: missing the '{key}' list")
        images: dict[int, ImageInfo] = {}
        for index, entry in enumerate(instances["images"]):
            where = f"{path}: images[{index}]"
            if not isinstance(entry, dict):
                raise ReferDataError(f"{where}: expected a dict, got {type(entry).__name__}")
            image_id, file_name = entry.get("id"), entry.get("file_name")
            height, width = entry.get("height"), entry.get("width")
            if not _is_int(image_id):
                raise ReferDataError(f"{where}: 'id' must be an int, got {image_id!r}")
            if not isinstance(file_name, str) or not file_name:
                raise ReferDataError(f"{where} (id {image_id}): 'file_name' must be a non-empty string")
            if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
                raise ReferDataError(
                    f"{where} (id {image_id}): 'height' and 'width' must be positive ints, got {height!r}, {width!r}"
                )
            if image_id in images:
                raise ReferDataError(f"{where}: duplicate image id {image_id}")
            try:
                image_path = safe_join(self.image_dir, file_name)
            except AnnotationError as error:
                raise ReferDataError(f"{where} (id {image_id}): {error}") from error
            images[image_id] = ImageInfo(image_id, file_name, height, width, image_path)
        annotations: dict[int, dict] = {}
        for index, entry in enumerate(instances["annotations"]):
            where = f"{path}: annotations[{index}]"
            if not isinstance(entry, dict):
                raise ReferDataError(f"{where}: expected a dict, got {type(entry).__name__}")
            for key in ("id", "image_id", "segmentation"):
                if key not in entry:
                    raise ReferDataError(f"{where}: missing '{key}'")
            if not _is_int(entry["id"]) or not _is_int(entry["image_id"]):
                raise ReferDataError(f"{where}: 'id' and 'image_id' must be ints")
            if entry["id"] in annotations:
                raise ReferDataError(f"{where}: duplicate annotation id {entry['id']}")
            annotations[entry["id"]] = entry
        return images, annotations

    def _parse_ref(self, entry, index: int) -> Ref:
        if not isinstance(entry, dict):
            raise ReferDataError(f"{self.refs_path}: entry {index}: expected a dict, got {type(entry).__name__}")
        where = f"{self.refs_path}: entry {index} (ref_id {entry.get('ref_id')!r})"
        for key in ("ref_id", "image_id", "ann_id", "split", "sentences"):
            if key not in entry:
                raise ReferDataError(f"{where}: missing '{key}'")
        if not _is_int(entry["ref_id"]) or not _is_int(entry["image_id"]):
            raise ReferDataError(f"{where}: 'ref_id' and 'image_id' must be ints")
        if not isinstance(entry["split"], str):
            raise ReferDataError(f"{where}: 'split' must be a string, got {entry['split']!r}")
        ann_ids = entry["ann_id"] if isinstance(entry["ann_id"], list) else [entry["ann_id"]]
        if not ann_ids or not all(_is_int(a) for a in ann_ids):
            raise ReferDataError(
                f"{where}: 'ann_id' must be an int or a non-empty list of ints, got {entry['ann_id']!r}"
            )
        if -1 in ann_ids:
            if not self.generalized or ann_ids != [-1]:
                expected = "exactly [-1] for no target" if self.generalized else "a real annotation id"
                raise ReferDataError(f"{where}: 'ann_id' {entry['ann_id']!r} is not valid; expected {expected}")
            ann_ids = []
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise ReferDataError(f"{where}: 'sentences' must be a non-empty list of sentence dicts, got {sentences!r}")
        parsed = []
        for position, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("sent"), str):
                raise ReferDataError(f"{where}: sentences[{position}] needs a string 'sent'")
            sent_id = sentence.get("sent_id")
            if sent_id is not None and not _is_int(sent_id):
                raise ReferDataError(f"{where}: sentences[{position}]: 'sent_id' must be an int, got {sent_id!r}")
            raw = sentence.get("raw")
            parsed.append(RefSentence(sentence["sent"], sent_id, raw if isinstance(raw, str) else None))
        return Ref(entry["ref_id"], entry["image_id"], entry["split"], tuple(ann_ids), tuple(parsed))

    # ------------------------------------------------------------------ validation
    def _clean_segmentation(self, ann: dict, image: ImageInfo) -> _Segmentation | None:
        """Usable parts of an annotation, or None. Polygons with fewer than 3 points (< 6 numbers) or an odd count
        are dropped, as ReLA and GSVA do, and recorded; crowd regions are kept (GSVA) unless `skip_crowd`.
        Coordinates and RLE strings are checked here, so a bad entry fails when the index is built."""
        ann_id = ann["id"]
        where = f"{self.instances_path}: annotation {ann_id}"
        if ann.get("iscrowd") and self.skip_crowd:
            self.skipped_crowd.append(ann_id)
            return None
        segmentation = ann["segmentation"]
        parts = [segmentation] if isinstance(segmentation, dict) else segmentation
        if not isinstance(parts, list):
            raise ReferDataError(f"{where}: 'segmentation' must be a polygon list or an RLE dict")
        polygons, rles = [], []
        for position, part in enumerate(parts):
            part_where = f"{where} segmentation[{position}]"
            if isinstance(part, dict):
                rles.append(self._check_rle(part, image, part_where))
            elif isinstance(part, list) and all(_is_number(v) for v in part):
                if len(part) < 6 or len(part) % 2:
                    self.dropped_polygons.append((ann_id, position, len(part)))
                    continue
                try:
                    check_polygon(part, image.height, image.width)
                except AnnotationError as error:
                    raise ReferDataError(f"{part_where} (image {image.image_id}): {error}") from error
                polygons.append(part)
            else:
                raise ReferDataError(f"{part_where} is neither a polygon nor an RLE dict")
        if not polygons and not rles:
            return None
        return _Segmentation(tuple(polygons), tuple(rles))

    @staticmethod
    def _check_rle(rle: dict, image: ImageInfo, where: str) -> dict:
        size, counts = rle.get("size"), rle.get("counts")
        if list(size or []) != [image.height, image.width]:
            raise ReferDataError(
                f"{where}: RLE size {size!r} does not match image {image.image_id} ({image.height}x{image.width})"
            )
        if isinstance(counts, str):
            try:
                counts = counts.encode("ascii")
            except UnicodeEncodeError as error:
                raise ReferDataError(f"{where}: compressed RLE 'counts' is not ASCII ({error})") from error
        if not isinstance(counts, (list, bytes)):
            raise ReferDataError(f"{where}: RLE 'counts' must be a list, str or bytes, got {type(counts).__name__}")
        try:
            check_rle_counts(counts, image.height, image.width)
        except AnnotationError as error:
            raise ReferDataError(f"{where} (image {image.image_id}): {error}") from error
        return {"size": [image.height, image.width], "counts": counts}

    def _check_refs(self) -> None:
        seen: set[int] = set()
        duplicates = 0
        for ref in self.refs:
            where = f"{self.refs_path}: ref {ref.ref_id}"
            duplicates += ref.ref_id in seen
            seen.add(ref.ref_id)
            image = self.images.get(ref.image_id)
            if image is None:
                raise ReferDataError(f"{where} names image {ref.image_id}, which {self.instances_path} does not have")
            usable = False
            for ann_id in ref.ann_ids:
                ann = self.annotations.get(ann_id)
                if ann is None:
                    raise ReferDataError(
                        f"{where} names annotation {ann_id}, which {self.instances_path} does not have"
                    )
                if ann["image_id"] != ref.image_id:
                    raise ReferDataError(
                        f"{where} (image {ref.image_id}) names annotation {ann_id} of image {ann['image_id']}"
                    )
                if ann_id not in self._segmentations:
                    self._segmentations[ann_id] = self._clean_segmentation(ann, image)
                usable = usable or self._segmentations[ann_id] is not None
            if ref.ann_ids and not usable:
                raise ReferDataError(
                    f"{where} (image {ref.image_id}) has no usable segmentation: annotation(s) "
                    f"{list(ref.ann_ids)} hold only polygons with fewer than 3 points"
                    + (" or crowd regions (skip_crowd=True)" if self.skip_crowd else "")
                )
        if duplicates:
            logger.warning("%s: %d duplicate ref_id(s); all entries are kept", self.refs_path, duplicates)
        if self.dropped_polygons:
            logger.warning(
                "%s: dropped %d polygon(s) with fewer than 3 points or an odd length (annotation ids %s)",
                self.instances_path, len(self.dropped_polygons), sorted({a for a, _, _ in self.dropped_polygons})[:10],
            )
        if self.skipped_crowd:
            logger.warning(
                "%s: skipped %d crowd annotation(s) named by refs (ids %s)",
                self.instances_path, len(self.skipped_crowd), self.skipped_crowd[:10],
            )

    def _index_refs(self) -> None:
        self._by_split: dict[str, dict[int, list[Ref]]] = {}
        for ref in self.refs:
            self._by_split.setdefault(ref.split, {}).setdefault(ref.image_id, []).append(ref)
        self.splits = tuple(sorted(self._by_split))

    # ------------------------------------------------------------------ queries
    def _split_index(self, split: str) -> dict[int, list[Ref]]:
        if split not in self._by_split:
            raise ReferDataError(
                f"{self.refs_path}: no split {split!r}; available: {', '.join(self.splits) or 'none'}"
            )
        return self._by_split[split]

    def refs_in_split(self, split: str) -> list[Ref]:
        return [ref for refs in self._split_index(split).values() for ref in refs]

    def image_ids(self, split: str) -> list[int]:
        """Images with at least one ref in `split`, in ascending id order (stable across runs)."""
        return sorted(self._split_index(split))

    def refs_of_image(self, image_id: int, split: str) -> list[Ref]:
        """Refs of one image in one split, in file order."""
        return list(self._split_index(split).get(image_id, []))

    def check_image_size(self, image_id: int) -> None:
        """Refuse image `image_id` unless instances.json's height and width match its file's header (read without
        decoding); run before any of its masks is decoded, so a claimed 60000x60000 never allocates."""
        if image_id in self._size_checked:
            return
        info = self.images[image_id]
        context = f"{self.name} image {image_id} ('{info.file_name}' in {self.instances_path})"
        if not os.path.exists(info.path):
            raise FileNotFoundError(f"{context}: image file not found: {info.path}")
        try:
            check_claimed_size((info.height, info.width), info.path, claimed_by="instances.json")
        except ValueError as error:
            raise ReferDataError(f"{context}: {error}") from error
        self._size_checked.add(image_id)

    def ann_mask(self, ann_id: int) -> np.ndarray:
        """Bool HxW mask of one annotation (union of its usable parts; all-zero if it has none)."""
        ann = self.annotations.get(ann_id)
        if ann is None:
            raise ReferDataError(f"{self.instances_path}: no annotation {ann_id}")
        image = self.images[ann["image_id"]]
        self.check_image_size(image.image_id)
        if ann_id not in self._segmentations:
            self._segmentations[ann_id] = self._clean_segmentation(ann, image)
        segmentation = self._segmentations[ann_id]
        if segmentation is None:
            return np.zeros((image.height, image.width), dtype=bool)
        rles = []
        if segmentation.polygons:
            rles.extend(coco_mask.frPyObjects(list(segmentation.polygons), image.height, image.width))
        for rle in segmentation.rles:
            uncompressed = isinstance(rle["counts"], list)
            rles.append(coco_mask.frPyObjects(rle, image.height, image.width) if uncompressed else rle)
        merged = rles[0] if len(rles) == 1 else coco_mask.merge(rles, intersect=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PYCOCOTOOLS_NUMPY2_WARNING, category=DeprecationWarning)
            return coco_mask.decode(merged).astype(bool)

    def ref_mask(self, ref: Ref) -> np.ndarray:
        """Bool HxW ground truth of a ref: the union of its annotations; all-zero for a no-target ref."""
        image = self.images[ref.image_id]
        self.check_image_size(ref.image_id)
        union = np.zeros((image.height, image.width), dtype=bool)
        for ann_id in ref.ann_ids:
            union |= self.ann_mask(ann_id)
        return union

    def load_image(self, image_id: int, loader=open_image) -> Image.Image:
        """Open an image by id; errors name the dataset, the image id and the file."""
        info = self.images[image_id]
        context = f"{self.name} image {image_id} ('{info.file_name}' in {self.instances_path})"
        try:
            image = loader(info.path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{context}: image file not found: {info.path}") from error
        except (OSError, ValueError, SyntaxError) as error:
            raise ReferDataError(f"{context}: cannot open {info.path}: {error}") from error
        if (image.height, image.width) != (info.height, info.width):
            raise ReferDataError(
                f"{context}: {info.path} is {image.height}x{image.width} but instances.json says "
                f"{info.height}x{info.width}"
            )
        return image


def _file_stamp(path: str) -> tuple:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return (path, None)
    return (path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _cached_refer(refer_seg_dir: str, dataset: str, split_by: str, skip_crowd: bool, stamps: tuple) -> ReferData:
    return ReferData(refer_seg_dir, dataset, split_by, skip_crowd=skip_crowd)


def load_refer(refer_seg_dir, dataset: str, split_by: str | None = None, skip_crowd: bool = False) -> ReferData:
    """`ReferData`, shared between readers of the same unchanged files (train and val read one index once)."""
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown refer dataset {dataset!r}; known: {', '.join(sorted(LAYOUTS))}")
    refer_seg_dir = os.path.abspath(os.fspath(refer_seg_dir))
    split_by = split_by or gsva_split_by(dataset)
    folder = os.path.join(refer_seg_dir, dataset)
    names = [f"refs({split_by}).p", f"grefs({split_by}).p", f"grefs({split_by}).json", "instances.json"]
    stamps = tuple(_file_stamp(os.path.join(folder, name)) for name in names)
    return _cached_refer(refer_seg_dir, dataset, split_by, bool(skip_crowd), stamps)


__all__ = [
    "LAYOUTS",
    "ImageInfo",
    "Ref",
    "RefSentence",
    "ReferData",
    "ReferDataError",
    "gsva_split_by",
    "load_refer",
    "open_image",
    "read_json",
]
