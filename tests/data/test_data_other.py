"""ReasonSeg, semantic/part segmentation, LLaVA VQA readers and the training mixture, on fixtures written in the
real file formats. Expected masks and prompt strings are computed here independently of the readers."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from gsva_hf.data.mixed import MixedTrainingDataset, build_val_dataset, parse_dataset_types, parse_sample_rates
from gsva_hf.data.reason_seg import ReasonSegDataset, ReasonSegValDataset, read_reason_seg_json, reason_seg_label
from gsva_hf.data.sample import Sample
from gsva_hf.data.sem_seg import SemSegDataset, load_ade20k_classes, load_cocostuff_classes
from gsva_hf.data.vqa import VQADataset
from tests._coco_fixtures import uncompressed_rle

# pycocotools 2.0.x calls `np.array(..., copy=False)` on its own objects; numpy 2 warns on every decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# GSVA's templates as written in the reference notes (model/llava/constants.py), without the leading "<image>\n".
LONG_Q = ["{sent} Please respond with segmentation mask.", "{sent} Please output segmentation mask."]
SHORT_Q = [
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
]
MODE4_Q = [
    "Can you segment {class_name} in this image?",
    "Please segment {class_name} in this image.",
    "What are {class_name} in this image? Please respond with segmentation masks.",
    "What are {class_name} in this image? Please output segmentation masks.",
]
EXPLAIN_Q = [
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explaination.",
]
ANSWERS = ["It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG]."]
MODE4_A = [
    ("The segmentation results are", "{class_name} [SEG]", "."),
    ("Sure, they are", "{class_name}:[SEG]", "."),
    ("Sure,", "the mask of {class_name} is [SEG]", "."),
    ("Sure,", "the segmentation of {class_name} is [SEG]", "."),
    ("Sure,", "the referred {class_name} is [SEG]", "."),
]

SENTS_A = ["the thing that holds coffee", "what keeps the drink warm", "the object on the left"]
EXPLANATION = "It is a mug, which holds hot drinks."


# ------------------------------------------------------------------------------------------------ fixture writers
def write_jpg(path, width, height, color=(120, 80, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path, quality=95)


def write_png(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        image.putdata(np.asarray(array, dtype=np.uint8).ravel().tolist())
    image.save(path)


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def rect_mask(height, width, x0, y0, x1, y1):
    """Pixels of an axis-aligned polygon with its outline: corners truncated to int, both ends inclusive."""
    mask = np.zeros((height, width), dtype=bool)
    mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    return mask


def reason_root(root):
    return root / "reason_seg" / "ReasonSeg"


def write_reason_seg(root):
    base = reason_root(root)
    write_jpg(base / "train" / "a.jpg", 40, 30)
    (base / "train" / "a.json").write_text(
        json.dumps(
            {
                "text": SENTS_A,
                "is_sentence": True,
                "shapes": [
                    {"label": "ignore_region", "points": rect(5, 5, 10, 8), "shape_type": "polygon"},
                    {"label": "Flag", "points": rect(0, 0, 39, 29)},
                    {"label": "target", "points": rect(2.7, 2.2, 30.9, 20.5)},
                ],
            }
        ),
        encoding="utf-8",
    )
    write_jpg(base / "train" / "b.jpg", 24, 20)
    (base / "train" / "b.json").write_bytes(
        json.dumps(
            {
                "text": ["Café’s Mug"],
                "is_sentence": False,
                "shapes": [{"label": "target", "points": rect(1, 2, 9, 12)}],
            },
            ensure_ascii=False,
        ).encode("cp1252")
    )
    (base / "explanatory").mkdir(parents=True)
    (base / "explanatory" / "train.json").write_text(
        json.dumps([{"image": "a.jpg", "query": SENTS_A[0], "outputs": EXPLANATION}]), encoding="utf-8"
    )
    write_jpg(base / "val" / "c.jpg", 32, 24)
    (base / "val" / "c.json").write_text(
        json.dumps(
            {
                "text": ["  Something you drink from. ", "unused second query"],
                "is_sentence": True,
                "shapes": [
                    {"label": "target", "points": rect(0, 0, 20, 20)},
                    {"label": "ignore", "points": rect(4, 4, 6, 6)},
                ],
            }
        ),
        encoding="utf-8",
    )
    write_jpg(base / "val" / "d.jpg", 16, 16)
    (base / "val" / "d.json").write_text(
        json.dumps({"text": ["Cup"], "is_sentence": False, "shapes": [{"label": "cup", "points": rect(3, 3, 8, 8)}]}),
        encoding="utf-8",
    )


ADE_LABEL = np.zeros((16, 20), dtype=np.uint8)
ADE_LABEL[:8] = 3  # sky
ADE_LABEL[8:, :10] = 1  # wall
ADE_LABEL[10:14, 12:16] = 13  # person
STUFF_LABEL = np.full((12, 18), 255, dtype=np.uint8)
STUFF_LABEL[:4] = 156  # sky
STUFF_LABEL[4:8] = 95  # building-other: ignored like every "-" class
STUFF_LABEL[8:, :9] = 0  # person
MAPILLARY_LABEL = np.zeros((10, 14), dtype=np.uint8)  # bird
MAPILLARY_LABEL[5:] = 1  # road
MAPILLARY_LABEL[:2, :3] = 2  # sky
MAPILLARY_NAMES = ["Bird", "Road", "Sky", "Unlabeled"]
PACO_H, PACO_W = 20, 30
PACO_HANDLE = rect_mask(PACO_H, PACO_W, 3, 4, 9, 15)
PASCAL_H, PASCAL_W = 18, 22


def write_sem_seg(root):
    write_jpg(root / "ade20k" / "images" / "training" / "ADE_train_00000001.jpg", 20, 16)
    write_png(root / "ade20k" / "annotations" / "training" / "ADE_train_00000001.png", ADE_LABEL)
    write_jpg(root / "ade20k" / "images" / "training" / "ADE_train_00000002.jpg", 8, 8)
    write_png(root / "ade20k" / "annotations" / "training" / "ADE_train_00000002.png", np.zeros((8, 8)))
    write_png(root / "cocostuff" / "train2017" / "000000000001.png", STUFF_LABEL)
    write_jpg(root / "coco" / "train2017" / "000000000001.jpg", 18, 12)
    (root / "mapillary").mkdir(parents=True)
    (root / "mapillary" / "config_v2.0.json").write_text(
        json.dumps({"labels": [{"name": n.lower(), "readable": n, "color": [0, 0, 0]} for n in MAPILLARY_NAMES]})
    )
    write_png(root / "mapillary" / "training" / "v2.0" / "labels" / "m1.png", MAPILLARY_LABEL, mode="P")
    write_jpg(root / "mapillary" / "training" / "images" / "m1.jpg", 14, 10)
    paco = {
        "images": [{"id": 10, "file_name": "train2017/000000000010.jpg", "height": PACO_H, "width": PACO_W}],
        "categories": [
            {"id": 1, "name": "mug_(drinking_container)"},
            {"id": 2, "name": "mug_(drinking_container):handle"},
            {"id": 3, "name": "bottle:cap_(bottle)"},
        ],
        "annotations": [
            {"id": 100, "image_id": 10, "category_id": 1, "segmentation": [sum(rect(1, 1, 20, 18), [])]},
            {"id": 101, "image_id": 10, "category_id": 2,
             "segmentation": {"size": [PACO_H, PACO_W], "counts": uncompressed_rle(PACO_HANDLE)["counts"]}},
            {"id": 102, "image_id": 10, "category_id": 3, "segmentation": [sum(rect(22, 2, 27, 6), [])]},
        ],
    }
    (root / "vlpart" / "paco" / "annotations").mkdir(parents=True)
    (root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json").write_text(json.dumps(paco))
    write_jpg(root / "coco" / "train2017" / "000000000010.jpg", PACO_W, PACO_H)
    pascal = {
        "images": [{"id": 1, "file_name": "2008_000001.jpg", "height": PASCAL_H, "width": PASCAL_W}],
        "categories": [{"id": 5, "name": "dog:head"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 5, "segmentation": [sum(rect(2, 2, 12, 10), [])]}],
    }
    (root / "vlpart" / "pascal_part" / "train.json").parent.mkdir(parents=True)
    (root / "vlpart" / "pascal_part" / "train.json").write_text(json.dumps(pascal))
    voc = root / "vlpart" / "pascal_part" / "VOCdevkit" / "VOC2010" / "JPEGImages"
    write_jpg(voc / "2008_000001.jpg", PASCAL_W, PASCAL_H)


VQA_ENTRIES = [
    {
        "id": "000000000033",
        "image": "000000000033.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A brown square."},
            {"from": "human", "value": "Is it bright?"},
            {"from": "gpt", "value": "No, it is fairly dark."},
        ],
    },
    {
        "id": "000000000034",
        "image": "000000000034.jpg",
        "conversations": [
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Describe this image.\n<image>"},
            {"from": "gpt", "value": "A flat colour."},
        ],
    },
]


def write_vqa(root):
    (root / "llava_dataset").mkdir(parents=True)
    (root / "llava_dataset" / "llava_instruct_150k.json").write_text(json.dumps(VQA_ENTRIES))
    write_jpg(root / "coco" / "train2017" / "000000000033.jpg", 12, 10)
    write_jpg(root / "coco" / "train2017" / "000000000034.jpg", 9, 7)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsva_data")
    write_reason_seg(root)
    write_sem_seg(root)
    write_vqa(root)
    return root


def expected_label_a():
    label = np.zeros((30, 40), dtype=np.uint8)
    label[rect_mask(30, 40, 2.7, 2.2, 30.9, 20.5)] = 1
    label[rect_mask(30, 40, 5, 5, 10, 8)] = 255
    return label


def parse_mode4_answer(answer, names):
    """The style index whose `START + ",".join(parts) + END` reproduces `answer` for these names, else None."""
    for style, (start, template, end) in enumerate(MODE4_A):
        if answer == start + " " + ",".join(template.format(class_name=n) for n in names) + end:
            return style
    return None


# ------------------------------------------------------------------------------------------------ ReasonSeg
def test_reason_seg_label_sorted_fill_ignore_and_flag(data_root):
    path = reason_root(data_root) / "train" / "a.json"
    label = reason_seg_label(read_reason_seg_json(path), 30, 40, path)
    np.testing.assert_array_equal(label, expected_label_a())


def test_reason_seg_cp1252_json(data_root):
    annotation = read_reason_seg_json(reason_root(data_root) / "train" / "b.json")
    assert annotation["text"] == ["Café’s Mug"]


def test_reason_seg_train_samples(data_root):
    dataset = ReasonSegDataset(data_root, explanatory=-1)
    assert len(dataset) == 2
    group = dataset.get_group(0)
    assert len(group) == 3 and sorted(s.targets[0] for s in group) == sorted(SENTS_A)
    for sample in group:
        assert isinstance(sample, Sample) and sample.source == "reason_seg"
        (question, answer), = sample.rounds
        text = sample.targets[0]
        assert question in [t.format(sent=text) for t in LONG_Q]
        assert answer in ANSWERS
        np.testing.assert_array_equal(sample.masks[0], expected_label_a() == 1)  # ignore pixels are background
        assert sample.rejected == [False]
    first = dataset[0]
    assert first.rounds == group[0].rounds and first.targets == group[0].targets
    phrase = dataset[1]
    assert phrase.rounds[0][0] in [t.format(class_name="café’s mug") for t in SHORT_Q]
    np.testing.assert_array_equal(phrase.masks[0], rect_mask(20, 24, 1, 2, 9, 12))
    capped = ReasonSegDataset(data_root, explanatory=-1, num_classes_per_sample=2)
    assert len(capped.get_group(0)) == 2


def test_reason_seg_explanatory_modes(data_root):
    dataset = ReasonSegDataset(data_root, explanatory=0.5, samples_per_epoch=300, seed=3)
    choices = Counter()
    for index in range(len(dataset)):
        sample = dataset[index]
        choice = sample.meta["explanatory_choice"]
        (question, answer), = sample.rounds
        if sample.meta["image"] == "b.jpg":
            assert choice == 0  # no explanation for b.jpg
            continue
        choices[choice] += 1
        text = SENTS_A[sample.meta["text_index"]]
        if choice == 0:
            assert question in [t.format(sent=text) for t in LONG_Q] and answer in ANSWERS
            assert sample.masks.shape == (1, 30, 40)
        elif choice == 1:
            assert question in [text + " " + q for q in EXPLAIN_Q]
            assert answer in [a + " " + EXPLANATION for a in ANSWERS]
            assert sample.masks.shape == (1, 30, 40)
        else:
            assert (question, answer) == (text, EXPLANATION)
            assert sample.masks.shape == (0, 30, 40) and sample.targets == []
    total = sum(choices.values())
    assert total > 100
    assert abs(choices[2] / total - 0.5) < 0.12 and abs(choices[1] / total - 0.25) < 0.1
    group = dataset.get_group(5)
    assert len({s.meta["explanatory_choice"] for s in group}) == 1  # one choice per image


def test_reason_seg_explanatory_file_required(tmp_path):
    base = reason_root(tmp_path) / "train"
    write_jpg(base / "x.jpg", 8, 8)
    (base / "x.json").write_text(json.dumps({"text": ["a"], "is_sentence": False, "shapes": []}))
    with pytest.raises(FileNotFoundError, match=r"explanatory.*train\.json"):
        ReasonSegDataset(tmp_path)
    sample = ReasonSegDataset(tmp_path, explanatory=-1)[0]
    assert sample.masks.shape == (1, 8, 8) and not sample.masks.any()


def test_reason_seg_val_prompts_and_ignore(data_root):
    gsva = ReasonSegValDataset(data_root, "ReasonSeg|val")
    lisa = ReasonSegValDataset(data_root, "ReasonSeg|val", ignore_mode="lisa")
    assert len(gsva) == 2
    sentence, phrase = gsva[0], gsva[1]
    assert sentence.rounds == [(" Something you drink from. Please output segmentation mask.", "[SEG]")]
    assert phrase.rounds == [(" What is Cup in this image? Please output segmentation mask.", "[SEG]")]
    label = np.zeros((24, 32), dtype=np.uint8)
    label[rect_mask(24, 32, 0, 0, 20, 20)] = 1
    label[rect_mask(24, 32, 4, 4, 6, 6)] = 255
    np.testing.assert_array_equal(sentence.gt_labels[0], label)
    np.testing.assert_array_equal(sentence.masks[0], label > 0)  # GSVA: ignore counts as target
    assert not sentence.ignore_masks.any()
    lisa_sample = lisa[0]
    np.testing.assert_array_equal(lisa_sample.masks[0], label == 1)
    np.testing.assert_array_equal(lisa_sample.ignore_masks[0], label == 255)
    with pytest.raises(ValueError, match="ignore_mode"):
        ReasonSegValDataset(data_root, "ReasonSeg|val", ignore_mode="other")


def _reason_case(tmp_path, json_text=None, image_bytes=None, write_json=True):
    base = reason_root(tmp_path) / "val"
    write_jpg(base / "e.jpg", 10, 10)
    if image_bytes is not None:
        (base / "e.jpg").write_bytes(image_bytes)
    if write_json:
        (base / "e.json").write_text(json_text)
    return ReasonSegValDataset(tmp_path, "ReasonSeg|val")


GOOD_SHAPES = [{"label": "t", "points": rect(1, 1, 5, 5)}]


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        ("missing_json", FileNotFoundError, r"e\.json"),
        ("bad_json", ValueError, r"e\.json.*not valid JSON"),
        ("bad_image", ValueError, r"e\.jpg"),
        ("two_points", ValueError, r"e\.json.*shapes\[1\].*at least 3 points"),
        ("no_text", ValueError, r"e\.json.*'text'"),
    ],
)
def test_reason_seg_malformed(tmp_path, case, error, pattern):
    good = json.dumps({"text": ["q"], "is_sentence": False, "shapes": GOOD_SHAPES})
    if case == "missing_json":
        dataset = _reason_case(tmp_path, write_json=False)
    elif case == "bad_json":
        dataset = _reason_case(tmp_path, '{"text": ["q"], "shapes": [')
    elif case == "bad_image":
        dataset = _reason_case(tmp_path, good, image_bytes=b"not a jpeg at all")
    elif case == "two_points":
        shapes = GOOD_SHAPES + [{"label": "t2", "points": [[0, 0], [3, 3]]}]
        dataset = _reason_case(tmp_path, json.dumps({"text": ["q"], "is_sentence": False, "shapes": shapes}))
    else:
        dataset = _reason_case(tmp_path, json.dumps({"text": [], "is_sentence": False, "shapes": GOOD_SHAPES}))
    with pytest.raises(error, match=pattern):
        dataset[0]


# ------------------------------------------------------------------------------------------------ sem_seg
def test_class_lists():
    ade = load_ade20k_classes()
    stuff = load_cocostuff_classes()
    assert len(ade) == 150 and ade[0] == "wall" and ade[2] == "sky" and ade[12] == "person" and ade[-1] == "flag"
    assert len(stuff) == 182 and stuff[0] == "person" and stuff[95] == "building-other" and stuff[156] == "sky"
    assert stuff[-1] == "wood"


def test_cocostuff_class_file_format(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("0: unlabeled\n1: person\n2: wall-brick\n")
    assert load_cocostuff_classes(path) == ["person", "wall-brick"]
    path.write_text("0: unlabeled\n1: person\n3 wall\n")
    with pytest.raises(ValueError, match=r"classes\.txt.*line 3"):
        load_cocostuff_classes(path)


def all_targets(dataset, index):
    sample = dataset[index]
    return {name: mask for name, mask in zip(sample.targets, sample.masks)}, sample


def test_sem_seg_label_maps(data_root):
    ade = SemSegDataset(data_root, "ade20k", num_classes_per_sample=10)
    targets, sample = all_targets(ade, 0)
    assert set(targets) == {"sky", "wall", "person"}
    for name, value in (("sky", 3), ("wall", 1), ("person", 13)):
        np.testing.assert_array_equal(targets[name], ADE_LABEL == value)
    assert sample.source == "sem_seg/ade20k" and sample.image.size == (20, 16)

    stuff = SemSegDataset(data_root, "cocostuff", num_classes_per_sample=10)
    targets, sample = all_targets(stuff, 0)
    assert set(targets) == {"sky", "person"}  # building-other has a "-": ignored
    np.testing.assert_array_equal(targets["sky"], STUFF_LABEL == 156)
    np.testing.assert_array_equal(targets["person"], STUFF_LABEL == 0)
    assert sample.image_path.endswith("coco/train2017/000000000001.jpg")

    mapillary = SemSegDataset(data_root, "mapillary", num_classes_per_sample=10)
    targets, _ = all_targets(mapillary, 0)
    assert set(targets) == {"bird", "road", "sky"}  # readable names, lower-cased
    for value, name in enumerate(["bird", "road", "sky"]):
        np.testing.assert_array_equal(targets[name], MAPILLARY_LABEL == value)


def test_sem_seg_part_sets(data_root):
    paco = SemSegDataset(data_root, "paco_lvis", num_classes_per_sample=10, samples_per_epoch=40)
    seen = set()
    for index in range(len(paco)):
        targets, sample = all_targets(paco, index)
        assert len(sample.targets) == 3
        seen.update(sample.targets)
        np.testing.assert_array_equal(targets["mug"], rect_mask(PACO_H, PACO_W, 1, 1, 20, 18) & targets["mug"])
        handle = [m for n, m in targets.items() if "handle" in n][0]
        np.testing.assert_array_equal(handle, PACO_HANDLE)
        cap = [m for n, m in targets.items() if "cap" in n][0]
        polygon = sum(rect(22, 2, 27, 6), [])
        expected_cap = mask_utils.decode(mask_utils.frPyObjects([polygon], PACO_H, PACO_W))[..., 0] > 0
        np.testing.assert_array_equal(cap, expected_cap)
    assert seen == {"mug", "mug handle", "the handle of the mug", "bottle cap", "the cap of the bottle"}

    pascal = SemSegDataset(data_root, "pascal_part", samples_per_epoch=20)
    names = {pascal[i].targets[0] for i in range(len(pascal))}
    assert names == {"dog head", "the head of the dog"}
    assert pascal[0].image_path.endswith("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg")


def test_sem_seg_templates_never_reject(data_root):
    dataset = SemSegDataset(data_root, samples_per_epoch=120, num_classes_per_sample=3)
    sources, styles, multi = Counter(), Counter(), 0
    for index in range(len(dataset)):
        sample = dataset[index]
        sources[sample.source] += 1
        (question, answer), = sample.rounds
        assert "[REJ]" not in answer and sample.rejected == [False] * len(sample.targets)
        assert answer.count("[SEG]") == len(sample.targets) == sample.masks.shape[0] <= 3
        assert all(mask.any() for mask in sample.masks)
        assert question in [q.format(class_name=", ".join(sample.targets).lower()) for q in MODE4_Q]
        style = parse_mode4_answer(answer, sample.targets)
        assert style is not None, answer
        styles[style] += 1
        multi += len(sample.targets) > 1
    assert len(sources) == 5 and len(styles) == 5 and multi > 50
    assert "sem_seg/ade20k" in sources


def test_sem_seg_redraws_empty_images(data_root):
    ade = SemSegDataset(data_root, "ade20k", samples_per_epoch=30)
    assert all(ade[i].image.size == (20, 16) for i in range(len(ade)))
    by_index = SemSegDataset(data_root, "ade20k")
    assert len(by_index) == 2 and by_index[1].image.size == (20, 16)  # image 2 has only "other" pixels


def test_sem_seg_malformed(tmp_path):
    write_jpg(tmp_path / "ade20k" / "images" / "training" / "bad.jpg", 6, 6)
    label = np.ones((6, 6), dtype=np.uint8)
    label[0, 0] = 200
    write_png(tmp_path / "ade20k" / "annotations" / "training" / "bad.png", label)
    with pytest.raises(ValueError, match=r"bad\.png.*\[200\]"):
        SemSegDataset(tmp_path, "ade20k")[0]
    (tmp_path / "ade20k" / "annotations" / "training" / "bad.png").unlink()
    with pytest.raises(ValueError, match=r"bad\.png"):
        SemSegDataset(tmp_path, "ade20k")[0]

    write_png(tmp_path / "mapillary" / "training" / "v2.0" / "labels" / "m.png", np.full((4, 4), 7), mode="P")
    (tmp_path / "mapillary" / "config_v2.0.json").write_text(json.dumps({"labels": [{"readable": "Sky"}]}))
    with pytest.raises(ValueError, match=r"m\.png.*\[7\]"):
        SemSegDataset(tmp_path, "mapillary")[0]

    pascal_json = tmp_path / "vlpart" / "pascal_part" / "train.json"
    pascal_json.parent.mkdir(parents=True)
    base = {
        "images": [{"id": 1, "file_name": "p.jpg", "height": 6, "width": 6}],
        "categories": [{"id": 5, "name": "dog:head"}],
    }
    unknown_category = {"id": 9, "image_id": 1, "category_id": 6, "segmentation": []}
    pascal_json.write_text(json.dumps({**base, "annotations": [unknown_category]}))
    with pytest.raises(ValueError, match=r"train\.json.*annotation 9.*unknown category_id 6"):
        SemSegDataset(tmp_path, "pascal_part")
    pascal_json.write_text(
        json.dumps({**base, "annotations": [{**unknown_category, "category_id": 5, "segmentation": [[0, 0, 4, 4]]}]})
    )
    with pytest.raises(ValueError, match=r"train\.json.*annotation 9.*3 points"):
        SemSegDataset(tmp_path, "pascal_part")[0]
    for segmentation, message in [
        ([[0, 0, 4, float("nan"), 4, 4]], "polygon 0: polygon has a non-finite y coordinate nan"),
        ([[0, 0, 1e30, 0, 4, 4]], "polygon 0: polygon x coordinate 1e\\+30 lies outside"),
        ({"size": [6, 6], "counts": "garbage"}, "compressed RLE 'counts' has character 'r' at position 2"),
        ({"size": [6, 6], "counts": [3, 4]}, "RLE runs sum to 7 pixels"),
    ]:
        annotation = {**unknown_category, "category_id": 5, "segmentation": segmentation}
        pascal_json.write_text(json.dumps({**base, "annotations": [annotation]}))
        with pytest.raises(ValueError, match=rf"train\.json.*annotation 9: {message}"):
            SemSegDataset(tmp_path, "pascal_part")[0]
    escaping = {**base, "images": [{**base["images"][0], "file_name": "../../../etc/passwd"}]}
    escaping["annotations"] = [{**unknown_category, "category_id": 5, "segmentation": [[0, 0, 4, 0, 4, 4]]}]
    pascal_json.write_text(json.dumps(escaping))
    with pytest.raises(ValueError, match=r"train\.json.*image 1: file name '\.\./\.\./\.\./etc/passwd' points outside"):
        SemSegDataset(tmp_path, "pascal_part")[0]
    pascal_json.write_text("{not json")
    with pytest.raises(ValueError, match=r"train\.json.*not valid JSON"):
        SemSegDataset(tmp_path, "pascal_part")
    with pytest.raises(ValueError, match="unknown sem_seg dataset"):
        SemSegDataset(tmp_path, "ade20k||partimagenet")


# ------------------------------------------------------------------------------------------------ VQA
def test_vqa_rounds(data_root):
    dataset = VQADataset(data_root)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first.rounds == [
        ("What is in the picture?", "A brown square."),
        ("Is it bright?", "No, it is fairly dark."),
    ]
    assert first.masks.shape == (0, 10, 12) and first.targets == [] and first.source == "vqa"
    assert second.rounds == [("Describe this image.", "A flat colour.")]  # leading gpt turn dropped
    assert second.image_path.endswith("coco/train2017/000000000034.jpg")


def test_vqa_malformed(tmp_path):
    path = tmp_path / "llava_dataset" / "llava_instruct_150k.json"
    path.parent.mkdir(parents=True)
    swapped = {"image": "x.jpg", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    path.write_text(json.dumps([VQA_ENTRIES[0], swapped]))
    dataset = VQADataset(tmp_path)
    with pytest.raises(ValueError, match=r"llava_instruct_150k\.json.*entry 1.*turn 1"):
        dataset[1]
    with pytest.raises(ValueError, match=r"000000000033\.jpg"):
        dataset[0]  # the image does not exist
    for name in ("/etc/passwd", "../../etc/passwd"):
        path.write_text(json.dumps([{**VQA_ENTRIES[0], "image": name}]))
        with pytest.raises(ValueError, match=rf"llava_instruct_150k\.json.*entry 0.*file name '{re.escape(name)}' points outside"):
            VQADataset(tmp_path)[0]
    path.write_text("[{]")
    with pytest.raises(ValueError, match=r"llava_instruct_150k\.json"):
        VQADataset(tmp_path)


# ------------------------------------------------------------------------------------------------ mixing
class StubDataset:
    def __init__(self, tag, samples_per_epoch):
        self.tag, self.size = tag, samples_per_epoch or 5

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return (self.tag, index)


def stub_factories(types):
    return {t: (lambda d, n, s, t=t: StubDataset(t, n)) for t in types}


def test_mixing_proportions_and_delegation(tmp_path):
    types = ["sem_seg", "refer_seg", "vqa", "reason_seg"]
    mixed = MixedTrainingDataset(tmp_path, samples_per_epoch=20000, seed=1, factories=stub_factories(types))
    counts = Counter(mixed.dataset_type(i) for i in range(len(mixed)))
    for name, rate in zip(types, [9, 3, 3, 1]):
        assert abs(counts[name] / 20000 - rate / 16) < 0.015
    assert mixed[17] == (mixed.dataset_type(17), 17)
    other = MixedTrainingDataset(tmp_path, samples_per_epoch=20000, seed=2, factories=stub_factories(types))
    assert [mixed.dataset_type(i) for i in range(200)] == [mixed.dataset_type(i) for i in range(200)]
    assert [mixed.dataset_type(i) for i in range(200)] != [other.dataset_type(i) for i in range(200)]
    zero = MixedTrainingDataset(tmp_path, datasets="vqa||reason_seg", sample_rates=[0, 1], samples_per_epoch=50,
                                factories=stub_factories(types))
    assert {zero.dataset_type(i) for i in range(50)} == {"reason_seg"}


def test_mixing_real_readers_deterministic(data_root):
    kwargs = dict(datasets="sem_seg||vqa||reason_seg", sample_rates="2,1,1", samples_per_epoch=40, seed=5,
                  explanatory=0.1)
    first, second = MixedTrainingDataset(data_root, **kwargs), MixedTrainingDataset(data_root, **kwargs)
    sources = Counter()
    for index in range(len(first)):
        a, b = first[index], second[index]
        assert a.rounds == b.rounds and a.targets == b.targets and a.image_path == b.image_path
        np.testing.assert_array_equal(a.masks, b.masks)
        sources[a.source.split("/")[0]] += 1
        assert a.source.split("/")[0] == first.dataset_type(index)
    assert set(sources) == {"sem_seg", "vqa", "reason_seg"}
    reshuffled = MixedTrainingDataset(data_root, **{**kwargs, "seed": 6})
    assert [reshuffled[i].rounds for i in range(10)] != [first[i].rounds for i in range(10)]


def test_mixing_no_sampling(data_root, tmp_path):
    mixed = MixedTrainingDataset(data_root, datasets="reason_seg", no_sampling=True, explanatory=-1)
    assert len(mixed) == 2
    assert [mixed[i].image_path.rsplit("/", 1)[1] for i in range(2)] == ["a.jpg", "b.jpg"]
    with pytest.raises(ValueError, match="exactly one"):
        MixedTrainingDataset(data_root, datasets="vqa||reason_seg", sample_rates="1,1", no_sampling=True)
    with pytest.raises(ValueError, match="refer_seg"):
        MixedTrainingDataset(tmp_path, datasets="refer_seg", sample_rates="1", no_sampling=True)


def test_spec_parsing():
    assert parse_dataset_types("sem_seg||refer_seg||vqa||reason_seg") == ["sem_seg", "refer_seg", "vqa", "reason_seg"]
    assert parse_sample_rates("9,3,3,1", 4) == [9 / 16, 3 / 16, 3 / 16, 1 / 16]
    with pytest.raises(ValueError, match="3 sample rates"):
        parse_sample_rates("9,3,3", 4)
    with pytest.raises(ValueError, match="unknown dataset type"):
        parse_dataset_types("sem_seg||detection")
    with pytest.raises(ValueError, match="non-negative"):
        parse_sample_rates("1,-1", 2)


def test_build_val_dataset_dispatch(data_root, monkeypatch):
    reason = build_val_dataset(data_root, "ReasonSeg|val", ignore_mode="lisa")
    assert isinstance(reason, ReasonSegValDataset) and reason.ignore_mode == "lisa"
    refer_seg = pytest.importorskip("gsva_hf.data.refer_seg")
    calls = []

    class Recorder:
        def __init__(self, dataset_dir, spec):
            calls.append(spec)

    monkeypatch.setattr(refer_seg, "ReferSegValDataset", Recorder)
    for spec in ("grefcoco|unc|val", "refcoco+|unc|testA"):
        assert isinstance(build_val_dataset(data_root, spec), Recorder)
    assert calls == ["grefcoco|unc|val", "refcoco+|unc|testA"]
    with pytest.raises(ValueError, match="val dataset spec"):
        build_val_dataset(data_root, "ReasonSeg")
