"""gRefCOCO-style referring data as a Hugging Face `datasets` dataset: the schema, its reader and a converter.

One row per referring entry (a gRefCOCO ref), so a split reads like `grefs(unc).json` with the image inside:

    image      Image()                                   the picture, stored in the dataset (bytes)
    image_id   int                                       rows with one image_id form one image's sample
    height     int, width int                            its size; every row of the image and every RLE agree
    ref_id     int
    sentences  List(string)                              the expressions (gRefCOCO `sent`), at least one
    masks      List({"size": List(int), "counts": string})
                                                         one COCO compressed RLE per target; [] for no target
    no_target  bool                                      true exactly when there is no target
    optional:  polygons  List(List(List(float)))         instead of `masks`: per target, its flat polygons
               sent_ids  List(int), ann_ids List(int)    identifiers kept in sample metadata
               split     string                          needed when the data is one Dataset, not a DatasetDict
               dataset   string                          the metric family: grefcoco (default), refcoco, ...

Readers name a source `hf:PATH_OR_REPO` (a `save_to_disk` folder, a folder of data files, or a Hub repo id) and
pick a split with `|split`, e.g. `--val_dataset "hf:data/grefcoco_hf|val"`; training takes `hf:PATH_OR_REPO`
in `--refer_seg_data` and reads its `train` split. Everything is validated when the index is built; a missing
column or a wrong type names the column and the expected form.

    python -m gsva_hf.data.hf_datasets --from-tree DATA --spec "grefcoco|unc|val" --out DIR
"""

import argparse
import hashlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as coco_mask

from ..rle import compressed_rle
from .guards import AnnotationError, check_polygon, check_rle_counts
from .images import check_claimed_size
from .refer import _PYCOCOTOOLS_NUMPY2_WARNING, LAYOUTS, ImageInfo, Ref, ReferDataError, RefSentence, open_image
from .refer_specs import HF_PREFIX, parse_val_spec

logger = logging.getLogger(__name__)

DEFAULT_KIND = "grefcoco"
_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_FLOATS = ("float16", "float32", "float64")
_STRINGS = ("string", "large_string")


def features():
    """The `datasets.Features` the converter writes (the reader also accepts other int/float/string widths)."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "height": Value("int32"),
            "width": Value("int32"),
            "ref_id": Value("int64"),
            "sentences": List(Value("string")),
            "sent_ids": List(Value("int64")),
            "ann_ids": List(Value("int64")),
            "masks": List({"size": List(Value("int32")), "counts": Value("string")}),
            "no_target": Value("bool"),
            "split": Value("string"),
            "dataset": Value("string"),
        }
    )


# ---------------------------------------------------------------------------------------------- schema checks
def _value(feature, dtypes) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in dtypes


def _list_of(feature, check) -> bool:
    from datasets import LargeList, List

    return isinstance(feature, (List, LargeList)) and check(feature.feature)


def _rle_struct(feature) -> bool:
    return (
        isinstance(feature, dict)
        and set(feature) == {"size", "counts"}
        and _list_of(feature["size"], lambda f: _value(f, _INTS))
        and _value(feature["counts"], _STRINGS)
    )


def _image(feature) -> bool:
    from datasets import Image

    return isinstance(feature, Image)


_COLUMNS = {
    # column: (required, check, expected form)
    "image": (True, _image, "an Image() feature"),
    "image_id": (True, lambda f: _value(f, _INTS), "an int Value"),
    "height": (True, lambda f: _value(f, _INTS), "an int Value"),
    "width": (True, lambda f: _value(f, _INTS), "an int Value"),
    "ref_id": (True, lambda f: _value(f, _INTS), "an int Value"),
    "sentences": (True, lambda f: _list_of(f, lambda g: _value(g, _STRINGS)), "List(Value('string'))"),
    "no_target": (True, lambda f: _value(f, ("bool",)), "a bool Value"),
    "masks": (False, lambda f: _list_of(f, _rle_struct), "List({'size': List(int), 'counts': string})"),
    "polygons": (
        False,
        lambda f: _list_of(f, lambda g: _list_of(g, lambda h: _list_of(h, lambda v: _value(v, _INTS + _FLOATS)))),
        "List(List(List(float))): per target, its flat [x1, y1, x2, y2, ...] polygons",
    ),
    "sent_ids": (False, lambda f: _list_of(f, lambda g: _value(g, _INTS)), "List(Value('int64'))"),
    "ann_ids": (False, lambda f: _list_of(f, lambda g: _value(g, _INTS)), "List(Value('int64'))"),
    "split": (False, lambda f: _value(f, _STRINGS), "a string Value"),
    "dataset": (False, lambda f: _value(f, _STRINGS), "a string Value"),
}


def check_schema(dataset, origin: str) -> str:
    """Refuse missing or mistyped columns, naming them and the expected form; returns the target column."""
    found = dataset.features
    for column, (required, check, expected) in _COLUMNS.items():
        if column not in found:
            if required:
                raise ReferDataError(
                    f"{origin}: missing column '{column}'; expected {expected} (columns: {sorted(found)})"
                )
            continue
        if not check(found[column]):
            raise ReferDataError(f"{origin}: column '{column}' is {found[column]}; expected {expected}")
    targets = [column for column in ("masks", "polygons") if column in found]
    if len(targets) != 1:
        raise ReferDataError(
            f"{origin}: needs exactly one target column, 'masks' ({_COLUMNS['masks'][2]}) or 'polygons' "
            f"({_COLUMNS['polygons'][2]}); found {targets or 'neither'}"
        )
    return targets[0]


# ---------------------------------------------------------------------------------------------- loading
def load_hf_split(source: str, split: str):
    """One split of a `save_to_disk` folder, a data-files folder or a Hub repo, as a `datasets.Dataset`."""
    import datasets

    origin = f"{HF_PREFIX}{source}"
    saved = os.path.isdir(source) and any(
        os.path.isfile(os.path.join(source, name)) for name in ("dataset_dict.json", "state.json")
    )
    try:
        loaded = datasets.load_from_disk(source) if saved else datasets.load_dataset(source)
    except (OSError, ValueError) as error:  # no such folder or repository, offline, not a dataset: name the spec
        raise ReferDataError(f"{origin}|{split}: cannot load it as a datasets source: {error}") from error
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise ReferDataError(f"{origin}: no split {split!r}; available: {', '.join(sorted(loaded)) or 'none'}")
        return loaded[split]
    if "split" not in loaded.column_names:
        raise ReferDataError(
            f"{origin}: a single Dataset (not a DatasetDict) needs a 'split' column to pick split {split!r}"
        )
    splits = list(loaded["split"])
    rows = [index for index, name in enumerate(splits) if name == split]
    if not rows:
        raise ReferDataError(f"{origin}: no row of split {split!r}; available: {', '.join(sorted(set(splits)))}")
    return loaded.select(rows)


@dataclass(frozen=True)
class HFRef(Ref):
    """A ref read from a datasets row; `ann_ids` are the row's `ann_ids`, or target positions without them."""

    row: int = -1


class HFReferData:
    """A `datasets` split read like `ReferData`: the same queries (`image_ids`, `refs_of_image`, `ref_mask`,
    `load_image`), so `ReferSegValDataset` and `ReferSegDataset` build the same samples from either source.

    Rows of one `image_id` must agree on its size; the image of its first row is shown.
    """

    def __init__(self, source: str, split: str, dataset=None):
        self.source, self.split = source, split
        self.refs_path = f"{HF_PREFIX}{source}[{split}]"
        origin = self.refs_path
        dataset = load_hf_split(source, split) if dataset is None else dataset
        self.target_column = check_schema(dataset, origin)
        self._dataset = dataset
        self._stored_images = None
        self._size_checked: set[int] = set()
        columns = [c for c in dataset.column_names if c != "image"]
        table = dataset.select_columns(columns).to_dict()
        self.name = self._kind(table.get("dataset"), origin)
        self.generalized = LAYOUTS[self.name].generalized
        if "split" in table and any(value != split for value in table["split"]):
            other = next(value for value in table["split"] if value != split)
            raise ReferDataError(f"{origin}: split {split!r} holds a row whose 'split' column says {other!r}")
        self.images: dict[int, ImageInfo] = {}
        self._first_row: dict[int, int] = {}
        self._targets: dict[int, tuple] = {}
        self.refs: list[HFRef] = []
        self._by_image: dict[int, list[HFRef]] = {}
        for row in range(len(dataset)):
            ref = self._read_row(table, row, origin)
            self.refs.append(ref)
            self._by_image.setdefault(ref.image_id, []).append(ref)
        duplicates = len(self.refs) - len({ref.ref_id for ref in self.refs})
        if duplicates:
            logger.warning("%s: %d duplicate ref_id(s); all rows are kept", origin, duplicates)
        self.splits = (split,)

    @staticmethod
    def _kind(values, origin: str) -> str:
        kinds = sorted(set(values), key=str) if values is not None else [DEFAULT_KIND]
        if len(kinds) != 1 or kinds[0] not in LAYOUTS:
            raise ReferDataError(
                f"{origin}: column 'dataset' must hold one name of {', '.join(sorted(LAYOUTS))} for the whole "
                f"split, got {kinds}"
            )
        return kinds[0]

    def _read_row(self, table: dict, row: int, origin: str) -> HFRef:
        ref_id, image_id = table["ref_id"][row], table["image_id"][row]
        where = f"{origin} row {row} (ref_id {ref_id})"
        height, width = table["height"][row], table["width"][row]
        for column, value in (("ref_id", ref_id), ("image_id", image_id)):
            if value is None:
                raise ReferDataError(f"{where}: '{column}' is empty")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise ReferDataError(f"{where}: 'height' and 'width' must be positive ints, got {height!r}, {width!r}")
        info = self.images.get(image_id)
        if info is None:
            info = ImageInfo(image_id, f"row {row}", height, width, f"{origin} row {row}")
            self.images[image_id] = info
            self._first_row[image_id] = row
        elif (info.height, info.width) != (height, width):
            raise ReferDataError(
                f"{where}: image {image_id} is {height}x{width} here but {info.height}x{info.width} in "
                f"row {self._first_row[image_id]}"
            )
        sentences = table["sentences"][row]
        if not sentences or any(not isinstance(text, str) for text in sentences):
            raise ReferDataError(f"{where}: 'sentences' must be a non-empty list of strings, got {sentences!r}")
        sent_ids = table["sent_ids"][row] if "sent_ids" in table else None
        if sent_ids is not None and len(sent_ids) != len(sentences):
            raise ReferDataError(f"{where}: {len(sent_ids)} 'sent_ids' for {len(sentences)} sentences")
        targets = self._read_targets(table[self.target_column][row], info, where)
        no_target = table["no_target"][row]
        if no_target is None or bool(no_target) != (not targets):
            raise ReferDataError(
                f"{where}: 'no_target' is {no_target!r} but the row has {len(targets)} target(s) in "
                f"'{self.target_column}'; it must be true exactly when there is none"
            )
        if no_target and not self.generalized:
            raise ReferDataError(f"{where}: a no-target row in a {self.name} split; only grefcoco has them")
        ann_ids = table["ann_ids"][row] if "ann_ids" in table else None
        if ann_ids is not None and len(ann_ids) != len(targets):
            raise ReferDataError(f"{where}: {len(ann_ids)} 'ann_ids' for {len(targets)} targets")
        self._targets[row] = targets
        parsed = tuple(
            RefSentence(text, None if sent_ids is None else sent_ids[i], None) for i, text in enumerate(sentences)
        )
        ids = tuple(range(len(targets))) if ann_ids is None else tuple(ann_ids)
        return HFRef(ref_id, image_id, self.split, ids, parsed, row=row)

    def _read_targets(self, targets, info: ImageInfo, where: str) -> tuple:
        """Validated per-target segmentations: a compressed RLE dict (`masks`) or a polygon list (`polygons`)."""
        if targets is None:
            return ()
        checked = []
        for position, target in enumerate(targets):
            target_where = f"{where}: {self.target_column}[{position}]"
            try:
                if self.target_column == "masks":
                    if list(target["size"] or []) != [info.height, info.width]:
                        raise AnnotationError(
                            f"RLE size {target['size']!r} does not match the image ({info.height}x{info.width})"
                        )
                    counts = target["counts"]
                    if not isinstance(counts, str) or not counts.isascii():
                        raise AnnotationError(f"RLE 'counts' must be an ASCII string, got {counts!r:.60}")
                    counts = counts.encode("ascii")
                    check_rle_counts(counts, info.height, info.width)
                    checked.append({"size": [info.height, info.width], "counts": counts})
                else:
                    if not target:
                        raise AnnotationError("a target needs at least one polygon")
                    for polygon in target:
                        if len(polygon) < 6 or len(polygon) % 2:
                            raise AnnotationError(
                                f"polygon of {len(polygon)} numbers; needs an even count of at least 6 (3 points)"
                            )
                        check_polygon(polygon, info.height, info.width)
                    checked.append([list(polygon) for polygon in target])
            except AnnotationError as error:
                raise ReferDataError(f"{target_where} (image {info.image_id}): {error}") from error
        return tuple(checked)

    # ------------------------------------------------------------------ queries (as ReferData)
    def _check_split(self, split: str) -> None:
        if split != self.split:
            raise ReferDataError(f"{self.refs_path}: no split {split!r}; this reader holds {self.split!r}")

    def refs_in_split(self, split: str) -> list[HFRef]:
        self._check_split(split)
        return list(self.refs)

    def image_ids(self, split: str) -> list[int]:
        """Images of the split in ascending id order (as `ReferData.image_ids`)."""
        self._check_split(split)
        return sorted(self._by_image)

    def refs_of_image(self, image_id: int, split: str) -> list[HFRef]:
        """Refs of one image in row order."""
        self._check_split(split)
        return list(self._by_image.get(image_id, []))

    def ref_mask(self, ref: HFRef) -> np.ndarray:
        """Bool HxW union of the row's targets; all-zero for a no-target row."""
        info = self.images[ref.image_id]
        self.check_image_size(ref.image_id)
        union = np.zeros((info.height, info.width), dtype=bool)
        for target in self._targets[ref.row]:
            rle = target if isinstance(target, dict) else coco_mask.merge(
                coco_mask.frPyObjects(target, info.height, info.width)
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_PYCOCOTOOLS_NUMPY2_WARNING, category=DeprecationWarning)
                union |= coco_mask.decode(rle).astype(bool)
        return union

    def _stored_bytes(self, image_id: int) -> bytes:
        """The embedded file bytes of `image_id`'s first row."""
        from datasets import Image

        row = self._first_row[image_id]
        if self._stored_images is None:
            self._stored_images = self._dataset.select_columns(["image"]).cast_column("image", Image(decode=False))
        stored = self._stored_images[row]["image"]
        if not stored or not stored.get("bytes"):
            path = (stored or {}).get("path")
            raise ReferDataError(
                f"{self.refs_path} row {row} (image {image_id}): the image is not stored in the dataset "
                f"(path {path!r}); embed it"
            )
        return stored["bytes"]

    def check_image_size(self, image_id: int) -> None:
        """Refuse image `image_id` unless its rows' height and width match the embedded file's header (read
        without decoding); run before any of its masks is decoded."""
        if image_id in self._size_checked:
            return
        info = self.images[image_id]
        context = f"{self.refs_path} row {self._first_row[image_id]} (image {image_id})"
        try:
            check_claimed_size(
                (info.height, info.width), io.BytesIO(self._stored_bytes(image_id)), "the stored image", "the row"
            )
        except ValueError as error:
            raise ReferDataError(f"{context}: {error}") from error
        self._size_checked.add(image_id)

    def load_image(self, image_id: int, loader=open_image):
        """The stored image of `image_id` (its first row), opened with `loader` from the embedded bytes; only
        images held in the dataset are opened, never a path a row names."""
        info = self.images[image_id]
        row = self._first_row[image_id]
        context = f"{self.refs_path} row {row} (image {image_id})"
        stored = {"bytes": self._stored_bytes(image_id)}
        try:
            image = loader(io.BytesIO(stored["bytes"]))
        except (OSError, ValueError, SyntaxError) as error:
            raise ReferDataError(f"{context}: cannot open the stored image: {error}") from error
        if (image.height, image.width) != (info.height, info.width):
            raise ReferDataError(
                f"{context}: the stored image is {image.height}x{image.width} but the row says "
                f"{info.height}x{info.width}"
            )
        return image


def load_hf_refer(source: str, split: str) -> HFReferData:
    return HFReferData(source, split)


# ---------------------------------------------------------------------------------------------- converter
def _tree_rows(dataset_dir: str, dataset: str, split_by: str, split: str):
    from .refer import load_refer

    data = load_refer(os.path.join(dataset_dir, "refer_seg"), dataset, split_by)
    for image_id in data.image_ids(split):
        info = data.images[image_id]
        with open(info.path, "rb") as handle:
            image = {"bytes": handle.read(), "path": os.path.basename(info.file_name)}
        for ref in data.refs_of_image(image_id, split):
            masks = [compressed_rle(data.ann_mask(ann_id)) for ann_id in ref.ann_ids]
            yield {
                "image": image,
                "image_id": image_id,
                "height": info.height,
                "width": info.width,
                "ref_id": ref.ref_id,
                "sentences": [sentence.sent for sentence in ref.sentences],
                "sent_ids": [sentence.sent_id for sentence in ref.sentences],
                "ann_ids": list(ref.ann_ids),
                "masks": masks,
                "no_target": ref.no_target,
                "split": split,
                "dataset": dataset,
            }


def tree_to_hf(dataset_dir, specs: str | list[str], out=None):
    """Convert refer splits of a GSVA data tree (`"grefcoco|unc|val"`, several `"||"`-joined) into a
    `DatasetDict` keyed by split, in the schema above; saved with `save_to_disk` when `out` is given.

    Each target is written as the compressed RLE of the mask the tree reader decodes for its annotation
    (polygons, RLEs and crowd regions merged), so both sources give identical samples.
    """
    import datasets

    dataset_dir = os.fspath(dataset_dir)
    spec_list = [s.strip() for s in specs.split("||")] if isinstance(specs, str) else list(specs)
    parsed = [parse_val_spec(spec) for spec in spec_list]
    splits = [split for _, _, split in parsed]
    if len(set(splits)) != len(splits):
        raise ValueError(f"specs {spec_list} name a split twice; a DatasetDict holds each split once")
    with tempfile.TemporaryDirectory() as cache:
        parts = {}
        for spec, (dataset, split_by, split) in zip(spec_list, parsed):
            parts[split] = datasets.Dataset.from_generator(
                _tree_rows,
                features=features(),
                cache_dir=cache,
                keep_in_memory=out is None,
                gen_kwargs={"dataset_dir": dataset_dir, "dataset": dataset, "split_by": split_by, "split": split},
                fingerprint=hashlib.sha256(f"{os.path.abspath(dataset_dir)}|{spec}".encode()).hexdigest()[:32],
            )
        result = datasets.DatasetDict(parts)
        if out is not None:
            result.save_to_disk(os.fspath(out))
            result = datasets.load_from_disk(os.fspath(out))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gsva_hf.data.hf_datasets",
        description="Convert refer splits of a GSVA data tree into the gRefCOCO-style `datasets` form "
        "(read back with --val_dataset 'hf:OUT|<split>' or --refer_seg_data 'hf:OUT').",
    )
    parser.add_argument("--from-tree", required=True, help="GSVA data root (holds refer_seg/)")
    parser.add_argument("--spec", required=True, help="'grefcoco|unc|val', several '||'-joined")
    parser.add_argument("--out", required=True, help="folder to save_to_disk into")
    args = parser.parse_args(argv)
    result = tree_to_hf(args.from_tree, args.spec, args.out)
    for split, part in result.items():
        images = len(set(part["image_id"]))
        print(f"{split}: {len(part)} refs over {images} images")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
