"""refer_seg readers, the safe unpickler and the collator, on tiny fixtures written in the real file formats.

Expected masks are built independently of the reader: rectangles by numpy slicing (pycocotools fills an integer
rectangle polygon [x0, x1) x [y0, y1)) and RLEs from the numpy arrays they were encoded from.
"""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from gsva_hf.data.collator import GSVACollator
from gsva_hf.data.guards import POLYGON_MARGIN, compressed_rle_counts
from gsva_hf.data.prompts import SHORT_QUESTION_LIST_MODE4, multi_target_answer, multi_target_question
from gsva_hf.data.refer import ReferData, ReferDataError
from gsva_hf.data.refer_seg import ReferSegDataset, ReferSegValDataset
from gsva_hf.data.safe_pickle import UnsafePickleError, load_plain, loads_plain
from gsva_hf.data.sample import Sample
from processing_gsva import MULTI_TARGET_ANSWER_STYLES, eval_answer, eval_question
from tests._coco_fixtures import uncompressed_rle
from tests.conftest import REPO

COCO_DIR = ("images", "mscoco", "images", "train2014")
CLEF_DIR = ("images", "saiapr_tc-12")
# image id -> (file name, width, height)
COCO_IMAGES = {
    1: ("COCO_train2014_000000000001.jpg", 40, 30),
    2: ("COCO_train2014_000000000002.png", 32, 24),
    3: ("COCO_train2014_000000000003.jpg", 24, 20),
    4: ("COCO_train2014_000000000004.jpg", 20, 16),
}


# ---------------------------------------------------------------------------------------------- fixture writers
def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(height, width, *boxes):
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def blob(height, width, cy, cx, radius):
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def compressed_rle(mask):
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def build_annotations():
    """COCO annotations (with every segmentation kind) and the mask each one should decode to."""
    h1, w1 = 30, 40
    blob_1 = blob(h1, w1, 20, 8, 5)
    green_1 = rect_mask(h1, w1, (28, 2, 38, 9)) | blob(h1, w1, 24, 33, 3)
    crowd_1 = rect_mask(h1, w1, (0, 25, 6, 30))
    blob_3 = blob(20, 24, 12, 16, 4)
    anns = [
        # two usable rectangles and one polygon with only 2 points, which must be dropped
        (101, 1, [rect(2, 3, 12, 13), rect(20, 20, 26, 25), [1, 1, 3, 3]],
         rect_mask(h1, w1, (2, 3, 12, 13), (20, 20, 26, 25))),
        (102, 1, compressed_rle(blob_1), blob_1),
        (103, 1, uncompressed_rle(green_1), green_1),
        (201, 2, [rect(1, 2, 10, 20)], rect_mask(24, 32, (1, 2, 10, 20))),
        (202, 2, [rect(12, 2, 30, 20)], rect_mask(24, 32, (12, 2, 30, 20))),
        (301, 3, [rect(0, 0, 8, 9)], rect_mask(20, 24, (0, 0, 8, 9))),
        (302, 3, uncompressed_rle(blob_3), blob_3),
        (401, 4, [rect(10, 2, 20, 15)], rect_mask(16, 20, (10, 2, 20, 15))),
    ]
    entries = []
    for ann_id, image_id, segmentation, expected in anns:
        ys, xs = np.nonzero(expected)
        entries.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": segmentation,
                "area": float(expected.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                "iscrowd": 0,
            }
        )
    entries.append(
        {"id": 104, "image_id": 1, "category_id": 1, "segmentation": uncompressed_rle(crowd_1), "area": 30.0,
         "bbox": [0, 25, 6, 5], "iscrowd": 1}
    )
    return entries, {ann_id: expected for ann_id, _, _, expected in anns}


def instances(images, annotations):
    return {
        "info": {"description": "fixture"},
        "licenses": [],
        "images": [
            {"id": i, "file_name": f, "width": w, "height": h, "license": 1, "coco_url": "", "date_captured": "",
             "flickr_url": ""}
            for i, (f, w, h) in images.items()
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }


def sentence(text, sent_id):
    return {"tokens": text.lower().split(), "raw": text, "sent": text, "sent_id": sent_id}


def ref(ref_id, image_id, ann_id, split, texts, first_sent_id, generalized=False):
    entry = {
        "ref_id": ref_id,
        "image_id": image_id,
        "ann_id": ann_id,
        "category_id": ([-1] if ann_id == [-1] else [1] * len(ann_id)) if generalized else 1,
        "split": split,
        "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
        "sent_ids": list(range(first_sent_id, first_sent_id + len(texts))),
        "sentences": [sentence(t, first_sent_id + i) for i, t in enumerate(texts)],
    }
    if generalized:
        entry["no_target"] = ann_id == [-1]
    return entry


GREFS = [
    ref(0, 1, [101, 102], "train", ["the red square and the blue blob.", "two things"], 0, True),
    ref(1, 1, [-1], "train", ["the yellow triangle"], 2, True),
    ref(2, 1, [103], "train", ["the green thing"], 3, True),
    ref(3, 2, [201, 202], "train", ["both boxes"], 4, True),
    ref(4, 3, [301, 302], "val", ["Both Shapes.", "all of them"], 5, True),
    ref(5, 3, [-1], "val", ["the red circle"], 7, True),
    ref(6, 3, [302], "val", ["the blob"], 8, True),
    ref(7, 4, [401], "testA", ["a box"], 9, True),
    ref(8, 2, [-1], "testB", ["nothing here"], 10, True),
]
REFS = [
    ref(10, 1, 101, "train", ["the red square", "red box"], 20),
    ref(11, 1, 102, "train", ["the blue blob."], 22),
    ref(12, 2, 201, "train", ["left box"], 23),
    ref(13, 3, 301, "val", ["The red square."], 24),
    ref(14, 3, 302, "val", ["shape two"], 25),
    ref(15, 4, 401, "testA", ["a box"], 26),
    ref(16, 2, 202, "testB", ["right box"], 27),
]
REFCOCOG = [
    ref(30, 1, 103, "train", ["the green thing, caf\u00e9 style"], 40),
    ref(31, 3, 302, "val", ["round blob"], 41),
    ref(32, 4, 401, "test", ["a box"], 42),
]
REFCLEF = [
    ref(50, 9, 901, "train", ["sky"], 60),
    ref(51, 9, 902, "val", ["left half"], 61),
    ref(52, 9, 902, "testC", ["left half again"], 62),
]


def py2_pickle(value) -> bytes:
    """A protocol-2 pickle as Python 2's cPickle writes it: `str` as 8-bit SHORT_BINSTRING/BINSTRING (latin-1)."""
    out = bytearray(b"\x80\x02")

    def write(item):
        if isinstance(item, bool):
            out.extend(b"\x88" if item else b"\x89")
        elif isinstance(item, int):
            out.extend(b"J" + struct.pack("<i", item))
        elif isinstance(item, str):
            data = item.encode("latin1")
            out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data)
        elif isinstance(item, list):
            out.extend(b"]")
            for child in item:
                write(child)
                out.extend(b"a")
        elif isinstance(item, dict):
            out.extend(b"}")
            for key, child in item.items():
                write(key)
                write(child)
                out.extend(b"s")
        else:
            raise TypeError(type(item))

    write(value)
    out.extend(b".")
    return bytes(out)


def write_image(path, width, height, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_tree(root):
    """A GSVA `dataset_dir` with refer_seg/{grefcoco,refcoco,refcoco+,refcocog,refclef} and their images."""
    refer_seg = os.path.join(root, "refer_seg")
    annotations, expected = build_annotations()
    for image_id, (name, width, height) in COCO_IMAGES.items():
        write_image(os.path.join(refer_seg, *COCO_DIR, name), width, height, image_id)
    coco = instances(COCO_IMAGES, annotations)
    for dataset in ("grefcoco", "refcoco", "refcoco+", "refcocog"):
        os.makedirs(os.path.join(refer_seg, dataset))
        with open(os.path.join(refer_seg, dataset, "instances.json"), "w") as handle:
            json.dump(coco, handle)
    with open(os.path.join(refer_seg, "grefcoco", "grefs(unc).json"), "w") as handle:
        json.dump(GREFS, handle)
    for dataset in ("refcoco", "refcoco+"):
        with open(os.path.join(refer_seg, dataset, "refs(unc).p"), "wb") as handle:
            pickle.dump(REFS, handle, protocol=2)
    with open(os.path.join(refer_seg, "refcocog", "refs(umd).p"), "wb") as handle:
        handle.write(py2_pickle(REFCOCOG))
    # refclef: its own images folder and instances
    clef_images = {9: ("09/9.jpg", 30, 20)}
    write_image(os.path.join(refer_seg, *CLEF_DIR, "09", "9.jpg"), 30, 20, 9)
    clef_anns = [
        {"id": 901, "image_id": 9, "category_id": 1, "segmentation": [rect(0, 0, 30, 6)], "area": 180.0,
         "bbox": [0, 0, 30, 6], "iscrowd": 0},
        {"id": 902, "image_id": 9, "category_id": 1, "segmentation": compressed_rle(rect_mask(20, 30, (0, 0, 15, 20))),
         "area": 300.0, "bbox": [0, 0, 15, 20], "iscrowd": 0},
    ]
    expected[901] = rect_mask(20, 30, (0, 0, 30, 6))
    expected[902] = rect_mask(20, 30, (0, 0, 15, 20))
    os.makedirs(os.path.join(refer_seg, "refclef"))
    with open(os.path.join(refer_seg, "refclef", "instances.json"), "w") as handle:
        json.dump(instances(clef_images, clef_anns), handle)
    with open(os.path.join(refer_seg, "refclef", "refs(unc).p"), "wb") as handle:
        pickle.dump(REFCLEF, handle, protocol=2)
    return expected


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_tree(root)


@pytest.fixture()
def fresh_tree(tmp_path):
    """A private copy for tests that break files."""
    write_tree(tmp_path)
    return tmp_path


def expected_ref_mask(expected, entry, shape):
    ann_ids = entry["ann_id"] if isinstance(entry["ann_id"], list) else [entry["ann_id"]]
    union = np.zeros(shape, dtype=bool)
    for ann_id in ann_ids:
        if ann_id != -1:
            union |= expected[ann_id]
    return union


def image_shape(image_id):
    _, width, height = COCO_IMAGES[image_id]
    return height, width


# ---------------------------------------------------------------------------------------------- safe pickle
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_pickle_loads_plain_data_and_python2_strings(tmp_path):
    data = [{"a": b"raw", "b": (1, 2.5, None, True), "c": "caf\u00e9", "d": [-1]}]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert loads_plain(pickle.dumps(data, protocol=protocol)) == data
    legacy = [{"sent": "caf\u00e9", "sent_id": 3, "ok": True}]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(py2_pickle(legacy))
    assert load_plain(path) == legacy


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_safe_pickle_refuses_code(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "evil": Exploit(str(marker))}], protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*(posix|os|nt)\.system"):
        load_plain(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps([{1, 2}], protocol=4))
    with pytest.raises(UnsafePickleError, match="set"):
        load_plain(path)


def test_safe_pickle_refuses_cycles_and_exponential_sharing(tmp_path):
    """A self-containing list (17 bytes) and a few hundred bytes of shared lists standing for 2**60 items are
    refused at once; sharing that stays proportional to the file is plain data and loads."""
    loop = []
    loop.append(loop)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(loop, protocol=2))
    assert path.stat().st_size < 20
    start = time.perf_counter()
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refused a container that contains itself"):
        load_plain(path)
    laughs = ["ha"]
    for _ in range(60):
        laughs = [laughs, laughs]
    path.write_bytes(pickle.dumps(laughs, protocol=2))
    assert path.stat().st_size < 1000
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refused shared references that expand"):
        load_plain(path)
    deep = []
    for _ in range(150):
        deep = [deep]
    path.write_bytes(pickle.dumps(deep, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"nested deeper than 100 levels"):
        load_plain(path)
    assert time.perf_counter() - start < 5
    tokens = ["the", "cat"]
    shared = [{"sent": "the cat", "tokens": tokens, "sent_id": i} for i in range(3)]
    shared.append({"ref": shared[0], "tokens": tokens})
    path.write_bytes(pickle.dumps(shared, protocol=2))
    loaded = load_plain(path)
    assert loaded == shared and loaded[3]["ref"] is loaded[0] and loaded[0]["tokens"] is loaded[1]["tokens"]


def test_refer_reader_refuses_malicious_refs(fresh_tree):
    marker = fresh_tree / "pwned"
    path = fresh_tree / "refer_seg" / "refcoco" / "refs(unc).p"
    path.write_bytes(pickle.dumps([Exploit(str(marker))], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p"):
        ReferSegValDataset(fresh_tree, "refcoco|unc|val")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- readers
def test_refer_data_masks_splits_and_skips(tree):
    root, expected = tree
    data = ReferData(root / "refer_seg", "grefcoco")
    assert data.splits == ("testA", "testB", "train", "val")
    assert [r.ref_id for r in data.refs_in_split("train")] == [0, 1, 2, 3]
    assert data.image_ids("val") == [3] and data.image_ids("testB") == [2]
    for ann_id, mask in expected.items():
        if ann_id < 900:
            assert np.array_equal(data.ann_mask(ann_id), mask), ann_id
    assert data.dropped_polygons == [(101, 2, 4)]
    assert data.annotations[104]["iscrowd"] == 1 and data.skipped_crowd == []
    assert data.refs[1].no_target and data.refs[1].ann_ids == ()
    assert np.array_equal(data.ref_mask(data.refs[0]), expected[101] | expected[102])
    assert not data.ref_mask(data.refs[1]).any()


def test_grefcoco_val_sample_is_gsva_prompt_verbatim(tree):
    root, expected = tree
    dataset = ReferSegValDataset(root, "grefcoco|unc|val")
    assert len(dataset) == 1
    sample = dataset[0]
    sentences = ["both shapes", "all of them", "the red circle", "the blob"]
    rejected = [False, False, True, False]
    assert sample.targets == sentences and sample.rejected == rejected
    assert sample.rounds == [(eval_question(sentences), eval_answer(sentences, rejected))]
    assert sample.rounds[0][0] == (
        " What are both shapes, all of them, the red circle, the blobin this image? Please output segmentation masks."
    )
    assert sample.rounds[0][1] == "Sure,both shapes:[SEG], all of them:[SEG], the red circle:[REJ], the blob:[SEG]."
    union = expected[301] | expected[302]
    for got, want in zip(sample.masks, [union, union, np.zeros_like(union), expected[302]]):
        assert np.array_equal(got, want)
    assert sample.masks.dtype == bool and sample.image.size == (24, 20)
    assert sample.meta["image_id"] == 3 and sample.meta["ref_ids"] == [4, 4, 5, 6]
    assert sample.meta["sent_ids"] == [5, 6, 7, 8]
    assert sample.image_path.endswith(os.path.join(*COCO_DIR, "COCO_train2014_000000000003.jpg"))
    assert sample.source == "refer_seg/grefcoco|unc|val"

    test_b = ReferSegValDataset(root, "grefcoco|unc|testB")[0]
    assert test_b.rejected == [True] and not test_b.masks.any()
    assert test_b.rounds[0][1] == "Sure,nothing here:[REJ]."
    assert len(ReferSegValDataset(root, "grefcoco|unc|testA")) == 1


def test_refcoco_family_val_splits(tree):
    root, expected = tree
    val = ReferSegValDataset(root, "refcoco|unc|val")
    assert len(val) == 1
    sample = val[0]
    assert sample.targets == ["the red square", "shape two"]
    assert sample.rounds[0][1] == "Sure,the red square:[SEG], shape two:[SEG]."
    assert np.array_equal(sample.masks[0], expected[301]) and np.array_equal(sample.masks[1], expected[302])
    assert [len(ReferSegValDataset(root, f"refcoco+|unc|{s}")) for s in ("val", "testA", "testB")] == [1, 1, 1]

    # refcocog: splitBy forced to umd whatever the spec says; the file is a Python-2 pickle with latin-1 text
    refcocog = ReferSegValDataset(root, "refcocog|google|val")
    assert refcocog.split_by == "umd" and refcocog.data.splits == ("test", "train", "val")
    assert refcocog.data.refs[0].sentences[0].sent == "the green thing, caf\u00e9 style"
    assert np.array_equal(ReferSegValDataset(root, "refcocog|umd|test")[0].masks[0], expected[401])

    clef = ReferSegValDataset(root, "refclef|unc|testC")
    sample = clef[0]
    assert sample.image_path.endswith(os.path.join(*CLEF_DIR, "09", "9.jpg"))
    assert sample.targets == ["left half again"] and np.array_equal(sample.masks[0], expected[902])


def test_unknown_split_and_dataset(tree):
    root, _ = tree
    with pytest.raises(ReferDataError, match=r"no split 'testC'.*testA, testB, train, val"):
        ReferSegValDataset(root, "grefcoco|unc|testC")
    with pytest.raises(ValueError, match=r"unknown refer dataset 'refcoco\+\+'"):
        ReferSegValDataset(root, "refcoco++|unc|val")
    with pytest.raises(ValueError, match="grefcoco\\|unc\\|val"):
        ReferSegValDataset(root, "grefcoco|val")
    with pytest.raises(ValueError, match="unknown refer dataset"):
        ReferSegDataset(root, "refcoco||nope")


def test_grefs_pickle_takes_precedence(fresh_tree):
    folder = fresh_tree / "refer_seg" / "grefcoco"
    (folder / "grefs(unc).p").write_bytes(pickle.dumps([GREFS[7]], protocol=2))
    data = ReferData(fresh_tree / "refer_seg", "grefcoco")
    assert data.refs_path.endswith("grefs(unc).p") and data.splits == ("testA",)


# ---------------------------------------------------------------------------------------------- training
ALL_REFS = {entry["ref_id"]: entry for entry in GREFS + REFS}


def test_training_samples_follow_gsva(tree):
    root, expected = tree
    dataset = ReferSegDataset(root, "refcoco||grefcoco", num_classes_per_sample=2, samples_per_epoch=24, seed=0)
    assert len(dataset) == 24
    seen_datasets, seen_rej = set(), False
    for index in range(len(dataset)):
        sample = dataset[index]
        meta = sample.meta
        seen_datasets.add(meta["dataset"])
        assert meta["split"] == "train" and 1 <= len(sample.targets) <= 2
        refs = [ALL_REFS[r] for r in meta["ref_ids"]]
        assert all(entry["split"] == "train" and entry["image_id"] == meta["image_id"] for entry in refs)
        pool = sum(len(e["sentences"]) for e in (GREFS if meta["dataset"] == "grefcoco" else REFS)
                   if e["split"] == "train" and e["image_id"] == meta["image_id"])
        assert len(sample.targets) == min(2, pool)
        assert len(set(zip(meta["ref_ids"], meta["sent_ids"]))) == len(sample.targets)
        shape = image_shape(meta["image_id"])
        slots = zip(refs, meta["sent_ids"], sample.targets, sample.masks, sample.rejected)
        for entry, sent_id, name, mask, rejected in slots:
            text = next(s["sent"] for s in entry["sentences"] if s["sent_id"] == sent_id)
            assert name == text.strip().strip(".")
            want = expected_ref_mask(expected, entry, shape)
            assert np.array_equal(mask, want)
            assert rejected == (not want.any())
            seen_rej = seen_rej or rejected
        assert not all(sample.rejected)
        question, answer = sample.rounds[0]
        styles = range(len(SHORT_QUESTION_LIST_MODE4))
        assert question in {multi_target_question(sample.targets, style=s) for s in styles}
        assert answer in {
            multi_target_answer(sample.targets, sample.rejected, style=s, separator=", ")
            for s in range(len(MULTI_TARGET_ANSWER_STYLES))
        }
        assert answer.count("[SEG]") + answer.count("[REJ]") == len(sample.targets)
    assert seen_datasets == {"refcoco", "grefcoco"} and seen_rej


def test_training_is_a_function_of_seed_and_index(tree):
    root, _ = tree
    first = ReferSegDataset(root, "refcoco||grefcoco", num_classes_per_sample=2, samples_per_epoch=12, seed=3)
    again = ReferSegDataset(root, "refcoco||grefcoco", num_classes_per_sample=2, samples_per_epoch=12, seed=3)
    other = ReferSegDataset(root, "refcoco||grefcoco", num_classes_per_sample=2, samples_per_epoch=12, seed=4)

    def key(sample):
        return (sample.rounds, sample.meta["ref_ids"], sample.meta["sent_ids"], sample.masks.tobytes())

    order = [7, 2, 11, 2, 0]
    assert [key(first[i]) for i in order] == [key(again[i]) for i in order]
    assert [key(first[i]) for i in range(12)] != [key(other[i]) for i in range(12)]
    with pytest.raises(IndexError):
        first[12]


def test_training_over_images_without_sampling(tree):
    root, _ = tree
    dataset = ReferSegDataset(root, "grefcoco", num_classes_per_sample=5, samples_per_epoch=None)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first.meta["image_id"] == 1 and sorted(first.meta["sent_ids"]) == [0, 1, 2, 3]
    assert second.meta["image_id"] == 2 and second.targets == ["both boxes"]
    with pytest.raises(ValueError, match="exactly one dataset"):
        ReferSegDataset(root, "grefcoco||refcoco", samples_per_epoch=None)


def test_training_without_any_target_fails_clearly(fresh_tree):
    refs = [dict(entry, ann_id=[-1]) if entry["split"] == "train" else entry for entry in GREFS]
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    dataset = ReferSegDataset(fresh_tree, "grefcoco", samples_per_epoch=2)
    with pytest.raises(ReferDataError, match=r"sample 1: 1000 draws from \['grefcoco'\] gave only \[REJ\]"):
        dataset[1]


# ---------------------------------------------------------------------------------------------- malformed inputs
def test_missing_files(fresh_tree):
    os.remove(fresh_tree / "refer_seg" / "refcoco" / "instances.json")
    with pytest.raises(FileNotFoundError, match=r"refcoco/instances\.json"):
        ReferSegValDataset(fresh_tree, "refcoco|unc|val")
    os.remove(fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json")
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.p nor .*grefs\(unc\)\.json"):
        ReferSegValDataset(fresh_tree, "grefcoco|unc|val")


def test_bad_json(fresh_tree):
    path = fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json"
    path.write_text(json.dumps(GREFS)[:-20])
    with pytest.raises(ReferDataError, match=r"grefs\(unc\)\.json: invalid JSON at line 1"):
        ReferSegValDataset(fresh_tree, "grefcoco|unc|val")


def test_ref_naming_unknown_annotation(fresh_tree):
    refs = [dict(entry) for entry in GREFS]
    refs[3] = dict(refs[3], ann_id=[201, 999])
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(ReferDataError, match=r"grefs\(unc\)\.json: ref 3 names annotation 999.*instances\.json"):
        ReferSegValDataset(fresh_tree, "grefcoco|unc|val")
    refs[3] = dict(GREFS[3], ann_id=[-1, 201])
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(ReferDataError, match=r"entry 3 \(ref_id 3\).*expected exactly \[-1\]"):
        ReferSegValDataset(fresh_tree, "grefcoco|unc|val")


def test_image_that_does_not_open(fresh_tree):
    path = fresh_tree.joinpath("refer_seg", *COCO_DIR, "COCO_train2014_000000000003.jpg")
    path.write_bytes(b"not an image at all")
    dataset = ReferSegValDataset(fresh_tree, "grefcoco|unc|val")
    with pytest.raises(ReferDataError, match=r"grefcoco image 3 .*COCO_train2014_000000000003\.jpg"):
        dataset[0]
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=r"grefcoco image 3 .*COCO_train2014_000000000003\.jpg"):
        dataset[0]
    write_image(str(path), 10, 10, 0)
    with pytest.raises(ReferDataError, match=r"is 10x10 but instances\.json says 20x24"):
        dataset[0]


def test_polygon_with_too_few_points(fresh_tree):
    path = fresh_tree / "refer_seg" / "refcoco" / "instances.json"
    coco = json.loads(path.read_text())
    for ann in coco["annotations"]:
        if ann["id"] == 301:
            ann["segmentation"] = [[0, 0, 8, 9], [1, 2, 3, 4, 5]]
    path.write_text(json.dumps(coco))
    with pytest.raises(ReferDataError, match=r"refs\(unc\)\.p: ref 13 \(image 3\) has no usable segmentation"):
        ReferSegValDataset(fresh_tree, "refcoco|unc|val")


def test_crowd_regions_are_decoded_into_the_masks_as_gsva_does(fresh_tree):
    """GSVA's readers decode `iscrowd=1` annotations like any other; `skip_crowd=True` keeps ReLA's choice."""
    refs = [dict(entry) for entry in GREFS] + [
        ref(98, 1, [101, 104], "val", ["square and crowd"], 98, True),
        ref(99, 1, [104], "val", ["the crowd"], 99, True),
    ]
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    crowd = rect_mask(30, 40, (0, 25, 6, 30))
    square = rect_mask(30, 40, (2, 3, 12, 13), (20, 20, 26, 25))
    data = ReferData(fresh_tree / "refer_seg", "grefcoco")
    assert data.skipped_crowd == []
    assert np.array_equal(data.ref_mask(data.refs[-1]), crowd)
    assert np.array_equal(data.ref_mask(data.refs[-2]), square | crowd)
    val = ReferSegValDataset(fresh_tree, "grefcoco|unc|val")
    sample = val[val.image_ids.index(1)]
    assert sample.targets == ["square and crowd", "the crowd"] and sample.rejected == [False, False]
    assert np.array_equal(sample.masks[0], square | crowd) and np.array_equal(sample.masks[1], crowd)

    with pytest.raises(ReferDataError, match=r"ref 99 \(image 1\) has no usable segmentation.*\[104\].*crowd"):
        ReferData(fresh_tree / "refer_seg", "grefcoco", skip_crowd=True)
    refs.pop()
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    data = ReferData(fresh_tree / "refer_seg", "grefcoco", skip_crowd=True)
    assert data.skipped_crowd == [104] and np.array_equal(data.ref_mask(data.refs[-1]), square)


def test_inner_full_stop_is_kept_as_gsva_does(fresh_tree, tiny_processor):
    """GSVA strips the sentence, lower-cases it and strips full stops at its ends only."""
    refs = [dict(entry) for entry in GREFS if entry["split"] != "val"]
    refs.append(ref(40, 3, [301], "val", ["  The red. Square. "], 40, True))
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    sample = ReferSegValDataset(fresh_tree, "grefcoco|unc|val")[0]
    assert sample.targets == ["the red. square"]
    assert sample.rounds == [(
        " What are the red. squarein this image? Please output segmentation masks.",
        "Sure,the red. square:[SEG].",
    )]
    by_hand = Sample(
        image=sample.image, rounds=[(" What are the red. squarein this image? Please output segmentation masks.",
                                     "Sure,the red. square:[SEG].")],
        masks=sample.masks, targets=["the red. square"], rejected=[False],
    )
    without_stop = Sample(
        image=sample.image, rounds=[(" What are the red squarein this image? Please output segmentation masks.",
                                     "Sure,the red square:[SEG].")],
        masks=sample.masks, targets=["the red square"], rejected=[False],
    )
    collate = GSVACollator(tiny_processor)
    ids = collate([sample])["input_ids"]
    assert torch.equal(ids, collate([by_hand])["input_ids"])
    assert not torch.equal(ids, collate([without_stop])["input_ids"])


# ---------------------------------------------------------------------------------------------- hostile inputs
def _edit_annotation(tree_root, ann_id, segmentation, dataset="refcoco"):
    path = tree_root / "refer_seg" / dataset / "instances.json"
    coco = json.loads(path.read_text())
    for ann in coco["annotations"]:
        if ann["id"] == ann_id:
            ann["segmentation"] = segmentation
    # json.dumps writes NaN for float("nan"), as a careless exporter would
    path.write_text(json.dumps(coco))


@pytest.mark.parametrize(
    "coordinate, message",
    [
        (float("nan"), "non-finite x coordinate nan"),
        (float("inf"), "non-finite x coordinate inf"),
        (1e30, "x coordinate 1e\\+30 lies outside the image"),
        (1e7, "x coordinate 10000000.0 lies outside the image"),
        (10**400, "x coordinate 10{23} lies outside the image"),
        (-9.0, "x coordinate -9.0 lies outside the image"),
    ],
)
def test_polygon_coordinates_are_checked_when_indexing(fresh_tree, coordinate, message):
    _edit_annotation(fresh_tree, 301, [[0, 0, coordinate, 0, 8, 9, 0, 9]])
    with pytest.raises(ReferDataError, match=rf"refcoco/instances\.json: annotation 301 segmentation\[0\] \(image 3\): polygon.*{message}"):
        ReferData(fresh_tree / "refer_seg", "refcoco")


def test_polygon_bombs_fail_fast_under_a_memory_cap(fresh_tree):
    """A NaN or 1e30 vertex made pycocotools allocate without bound; the reader must refuse it before decoding,
    so a 2 GB address-space cap is never reached."""
    _edit_annotation(fresh_tree, 301, [[0, 0, 1e30, 0, 8, 9, 0, float("nan")]])
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from gsva_hf.data.refer import ReferData, ReferDataError\n"
        "try:\n"
        "    data = ReferData(sys.argv[1] + '/refer_seg', 'refcoco')\n"
        "    print([data.ref_mask(ref).sum() for ref in data.refs])\n"
        "except ReferDataError as error:\n"
        "    print('refused:', error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(fresh_tree)], capture_output=True, text=True, timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "annotation 301" in result.stdout and "lies outside" in result.stdout


def test_polygon_on_or_just_past_the_border_keeps_its_mask(fresh_tree):
    """Overshoot up to POLYGON_MARGIN pixels is kept as stored; pycocotools clips it, so the mask is what the
    in-image rectangle gives. A polygon with no part inside the image is refused, not turned into [REJ]."""
    _edit_annotation(fresh_tree, 301, [[16, -0.5, 24 + POLYGON_MARGIN, -0.5, 24 + POLYGON_MARGIN, 9, 16, 9]])
    data = ReferData(fresh_tree / "refer_seg", "refcoco")
    assert np.array_equal(data.ann_mask(301), rect_mask(20, 24, (16, 0, 24, 9)))
    _edit_annotation(fresh_tree, 301, [[24, 0, 26, 0, 26, 9, 24, 9]])
    with pytest.raises(ReferDataError, match=r"annotation 301 .*lies wholly outside the 20x24 image"):
        ReferData(fresh_tree / "refer_seg", "refcoco")


@pytest.mark.parametrize(
    "counts, message",
    [
        ("not an RLE!", "character 't' at position 2"),
        ("0" * 5 + "o", "ends in the middle of a number"),
        ("oooooooo0", "a number of 9 characters"),
        ("54", "RLE runs sum to 9 pixels, but the 20x24 image has 480"),
        ("\u00e9t\u00e9", "not ASCII"),
    ],
)
def test_garbage_rle_is_refused_when_indexing(fresh_tree, counts, message):
    _edit_annotation(fresh_tree, 302, {"size": [20, 24], "counts": counts})
    with pytest.raises(ReferDataError, match=rf"refcoco/instances\.json: annotation 302 segmentation\[0\].*{message}"):
        ReferData(fresh_tree / "refer_seg", "refcoco")


def test_rle_parser_matches_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((height, width)) < [0.0, 1.0, 0.5, 0.05][trial % 4]
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], changes, [flat.size]))
        runs = np.diff(edges).tolist()
        if flat[0]:
            runs = [0] + runs
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        assert compressed_rle_counts(encoded).tolist() == runs


def test_ref_without_sentences_is_refused(fresh_tree):
    refs = [dict(entry) for entry in GREFS]
    refs[6] = dict(refs[6], sentences=[])
    (fresh_tree / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(ReferDataError, match=r"grefs\(unc\)\.json: entry 6 \(ref_id 6\): 'sentences' must be a non-empty"):
        ReferData(fresh_tree / "refer_seg", "grefcoco")


@pytest.mark.parametrize("file_name", ["../../../../etc/passwd", "/etc/passwd", "a/../../b.jpg"])
def test_image_names_outside_the_data_tree_are_refused(fresh_tree, file_name):
    path = fresh_tree / "refer_seg" / "refcoco" / "instances.json"
    coco = json.loads(path.read_text())
    coco["images"][1]["file_name"] = file_name
    path.write_text(json.dumps(coco))
    with pytest.raises(ReferDataError, match=rf"instances\.json: images\[1\] \(id 2\): file name '{re.escape(file_name)}' points outside"):
        ReferData(fresh_tree / "refer_seg", "refcoco")


# ---------------------------------------------------------------------------------------------- collator
def test_collator_batches_mixed_sizes(tree, tiny_processor):
    root, _ = tree
    samples = [
        ReferSegValDataset(root, "grefcoco|unc|val")[0],
        ReferSegDataset(root, "refcoco", num_classes_per_sample=3, samples_per_epoch=4, seed=1)[0],
        ReferSegValDataset(root, "grefcoco|unc|testB")[0],
    ]
    assert len({s.image.size for s in samples}) > 1
    batch = GSVACollator(tiny_processor, return_samples=True)(samples)
    assert batch["samples"] == samples
    rows, width = batch["input_ids"].shape
    assert rows == 3 and batch["labels"].shape == (rows, width) and batch["attention_mask"].shape == (rows, width)
    assert batch["pixel_values"].shape[0] == 3 and batch["sam_pixel_values"].shape[0] == 3
    token_ids = tiny_processor.token_ids
    tokenizer = tiny_processor.tokenizer
    for row, sample in enumerate(samples):
        ids, labels, attention = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        length = int(attention.sum())
        assert attention[:length].all() and not attention[length:].any()
        assert (labels[length:] == -100).all()
        slots = [int(t) for t in ids if int(t) in (token_ids["seg_token_id"], token_ids["rej_token_id"])]
        assert len(slots) == sample.masks.shape[0] == batch["gt_masks"][row].shape[0]
        assert [t == token_ids["rej_token_id"] for t in slots] == sample.rejected
        gt = batch["gt_masks"][row]
        assert gt.dtype == torch.float32 and tuple(gt.shape[1:]) == (sample.image.height, sample.image.width)
        assert torch.equal(gt.bool(), torch.from_numpy(sample.masks))
        trained = labels != -100
        first = int(trained.nonzero()[0])
        assert trained[first:length].all() and not trained[:first].any()
        assert int(ids[first - 1]) not in (token_ids["image_token_id"],)
        assert torch.equal(labels[trained], ids[trained])
        text = tokenizer.decode(labels[trained].tolist(), skip_special_tokens=False)
        answer = sample.rounds[0][1]
        assert "".join(text.split()) == "".join(answer.split()) + tokenizer.eos_token
    plain = GSVACollator(tiny_processor)(samples[:1])
    assert "samples" not in plain and len(plain["gt_masks"]) == 1


def test_collator_rejects_mask_count_mismatch(tree, tiny_processor):
    root, _ = tree
    sample = ReferSegValDataset(root, "grefcoco|unc|testB")[0]
    sample.rounds = [(sample.rounds[0][0], "Sure,nothing here:[REJ], again:[SEG].")]
    message = r"row 0 \(refer_seg/grefcoco\|unc\|testB.*2 \[SEG\]/\[REJ\] tokens but .* 1 masks"
    with pytest.raises(ValueError, match=message):
        GSVACollator(tiny_processor)([sample])
