"""The synthetic GRES task: exact gRefCOCO files whose text, masks and pixels agree.

Expected targets are recomputed here from the pixels, the stored polygons and a small parser of the task's grammar,
not from the generator's internals, so a wrong expression or a mislabelled mask fails.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from gsva_hf.data import synthetic
from gsva_hf.data.synthetic import PALETTE, SPLITS, write_synthetic_grefcoco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SIZES = {"train": 16, "val": 40, "testA": 6, "testB": 6}
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    manifest = write_synthetic_grefcoco(root, num_images=SIZES, image_size=128, seed=3)
    g = root / "refer_seg" / "grefcoco"
    refs = json.loads((g / "grefs(unc).json").read_text())
    instances = json.loads((g / "instances.json").read_text())
    return root, manifest, refs, instances


@pytest.fixture(scope="module")
def scene(tree):
    """Per image: each annotation's decoded mask, colour (read from the pixels), shape and bbox centre."""
    root, _, _, instances = tree
    names = {c["id"]: c["name"] for c in instances["categories"]}
    image_dir = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    anns_by_image = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    palette = np.array(list(PALETTE.values()), dtype=int)
    out = {}
    for image in instances["images"]:
        pixels = np.asarray(Image.open(image_dir / image["file_name"]).convert("RGB"), dtype=int)
        assert pixels.shape == (image["height"], image["width"], 3)
        dist = np.abs(pixels[:, :, None, :] - palette[None, None]).max(-1)
        label = np.where(dist.min(-1) <= 40, dist.argmin(-1), -1)
        objects = []
        for ann in anns_by_image.get(image["id"], []):
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
            m = mask_utils.decode(rle).astype(bool)
            votes = Counter(label[m].tolist())
            colour_index, count = votes.most_common(1)[0]
            assert colour_index >= 0 and count / m.sum() > 0.99, f"annotation {ann['id']} is not one palette colour"
            x, y, w, h = ann["bbox"]
            objects.append({"id": ann["id"], "mask": m, "color": list(PALETTE)[colour_index],
                            "shape": names[ann["category_id"]], "center": (x + w / 2, y + h / 2)})
        out[image["id"]] = (label, objects)
    return out


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    small = {"train": 5, "val": 4, "testA": 2, "testB": 2}
    write_synthetic_grefcoco(a, num_images=small, seed=1)
    write_synthetic_grefcoco(b, num_images=small, seed=1)
    write_synthetic_grefcoco(c, num_images=small, seed=2)
    files_a = _files(a)
    assert files_a == _files(b)
    assert len([f for f in files_a if f.endswith(".png")]) == sum(small.values())
    assert files_a["refer_seg/grefcoco/grefs(unc).json"] != _files(c)["refer_seg/grefcoco/grefs(unc).json"]


def test_one_split_does_not_change_another(tmp_path):
    write_synthetic_grefcoco(tmp_path / "a", num_images={"train": 0, "val": 3, "testA": 0, "testB": 0}, seed=5)
    write_synthetic_grefcoco(tmp_path / "b", num_images={"train": 0, "val": 5, "testA": 0, "testB": 0}, seed=5)
    refs_a = json.loads((tmp_path / "a/refer_seg/grefcoco/grefs(unc).json").read_text())
    refs_b = json.loads((tmp_path / "b/refer_seg/grefcoco/grefs(unc).json").read_text())
    assert refs_a == refs_b[: len(refs_a)]


def test_layout_fields_and_ids(tree):
    root, manifest, refs, instances = tree
    assert (root / "README.txt").exists() and json.loads((root / "synthetic_grefcoco.json").read_text())
    images = {i["id"]: i for i in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    cats = {c["id"] for c in instances["categories"]}
    assert len(images) == len(instances["images"]) and len(anns) == len(instances["annotations"])
    assert {c["name"] for c in instances["categories"]} == set(manifest["parameters"]["shapes"])
    for image in images.values():
        assert set(image) >= {"id", "file_name", "height", "width"}
        assert image["file_name"] == f"COCO_train2014_{image['id']:012d}.png"
    for ann in anns.values():
        assert ann["image_id"] in images and ann["category_id"] in cats and ann["iscrowd"] == 0
        assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) >= 6
        assert len(ann["segmentation"][0]) % 2 == 0 and ann["area"] > 0 and len(ann["bbox"]) == 4
    assert len({r["ref_id"] for r in refs}) == len(refs)
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)
    for ref in refs:
        assert set(ref) == {"ref_id", "image_id", "ann_id", "category_id", "split", "sentences", "file_name",
                            "no_target", "sent_ids"}
        assert ref["image_id"] in images and ref["split"] in SPLITS
        assert ref["file_name"].startswith(images[ref["image_id"]]["file_name"][:-4] + "_")
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert ref["no_target"] == (ref["ann_id"] == [-1])
        if ref["no_target"]:
            assert ref["category_id"] == [-1]
        else:
            assert ref["ann_id"] == sorted(set(ref["ann_id"]))
            assert all(anns[a]["image_id"] == ref["image_id"] for a in ref["ann_id"])
            assert ref["category_id"] == [anns[a]["category_id"] for a in ref["ann_id"]]
        for s in ref["sentences"]:
            assert s["sent"] == s["sent"].lower().strip() and "." not in s["sent"]
            assert s["raw"].lower().rstrip(".") == s["sent"] and s["tokens"] == s["sent"].split()


def test_polygon_masks_match_painted_pixels(scene):
    for image_id, (label, objects) in scene.items():
        for colour_index, colour in enumerate(PALETTE):
            painted = label == colour_index
            union = np.zeros_like(painted)
            for obj in objects:
                if obj["color"] == colour:
                    assert (obj["mask"] & union).sum() == 0
                    union |= obj["mask"]
            inter, uni = (painted & union).sum(), (painted | union).sum()
            assert uni == 0 or inter / uni > 0.99, f"image {image_id} {colour}: IoU {inter / uni:.3f}"


def _parse_np(words):
    assert words[0] == "the"
    colour = words[1] if len(words) == 3 else None
    noun = words[-1]
    singular = noun[:-2] if noun.endswith("es") and noun[:-2] in synthetic.ALL_SHAPES else noun.rstrip("s")
    plural = singular != noun
    return colour, (None if singular == "shape" else singular), plural


def _match(objects, colour, shape):
    return [o for o in objects if (colour is None or o["color"] == colour) and (shape is None or o["shape"] == shape)]


def _expected(sentence, objects, margin):
    """Targets of a sentence by the task's grammar: NP | NP and NP | NP <relation> NP."""
    words = sentence.split()
    for relation, (axis, sign) in RELATIONS.items():
        rel = relation.split()
        for i in range(1, len(words)):
            if words[i:i + len(rel)] == rel:
                subject, anchor = _parse_np(words[:i]), _parse_np(words[i + len(rel):])
                assert not subject[2] and not anchor[2]
                anchors = _match(objects, *anchor[:2])
                assert len(anchors) == 1, f"{sentence!r}: anchor is not unique"
                a = anchors[0]
                candidates = [o for o in _match(objects, *subject[:2]) if o is not a]
                deltas = [(o["center"][axis] - a["center"][axis]) * sign for o in candidates]
                assert all(abs(d) >= margin for d in deltas), f"{sentence!r}: a candidate is too close to call"
                hits = [o for o, d in zip(candidates, deltas) if d > 0]
                assert len(hits) == 1, f"{sentence!r}: {len(hits)} candidates on that side"
                return hits, "relational"
    if "and" in words:
        i = words.index("and")
        parts = [_parse_np(words[:i]), _parse_np(words[i + 1:])]
        found = []
        for colour, shape, plural in parts:
            assert colour and shape
            hit = _match(objects, colour, shape)
            assert hit and plural == (len(hit) > 1), f"{sentence!r}: part missing or wrong number"
            found += hit
        return found, "multi"
    colour, shape, plural = _parse_np(words)
    hit = _match(objects, colour, shape)
    if hit:
        assert plural == (len(hit) > 1), f"{sentence!r}: number does not match {len(hit)} instances"
    else:
        assert colour and shape and not plural, f"{sentence!r}: absent targets name a colour and a shape"
    return hit, "absent" if not hit else ("single" if colour and shape else "attribute")


def test_expressions_refer_to_exactly_the_matching_instances(tree, scene):
    _, manifest, refs, _ = tree
    margin = manifest["parameters"]["relation_margin_px"]
    kinds = Counter()
    for ref in refs:
        _, objects = scene[ref["image_id"]]
        hits, kind = _expected(ref["sentences"][0]["sent"], objects, margin)
        kinds[kind] += 1
        expected = sorted(o["id"] for o in hits) or [-1]
        assert ref["ann_id"] == expected, f"ref {ref['ref_id']} {ref['sentences'][0]['sent']!r}"
    assert all(kinds[k] > 0 for k in ("single", "attribute", "multi", "relational", "absent")), kinds
    per_image = Counter((r["image_id"], r["sentences"][0]["sent"]) for r in refs)
    assert max(per_image.values()) == 1


def test_splits_counts_and_manifest(tree):
    _, manifest, refs, instances = tree
    split_of = {}
    for ref in refs:
        assert split_of.setdefault(ref["image_id"], ref["split"]) == ref["split"]
    assert len(split_of) == len(instances["images"]) == sum(SIZES.values())
    assert Counter(split_of.values()) == Counter(SIZES)
    for split in SPLITS:
        rows = [r for r in refs if r["split"] == split]
        stats = manifest["stats"][split]
        assert stats["images"] == SIZES[split] and stats["refs"] == len(rows)
        assert stats["no_target_refs"] == sum(r["no_target"] for r in rows)
        assert stats["multi_target_refs"] == sum(len(r["ann_id"]) > 1 for r in rows)
    present = {r["image_id"] for r in refs if not r["no_target"]}
    assert present == set(split_of), "every image has at least one present target"


def test_val_absent_targets_are_mostly_hard_negatives(tree, scene):
    _, _, refs, _ = tree
    hard = total = 0
    for ref in refs:
        if ref["split"] != "val" or not ref["no_target"]:
            continue
        colour, shape, _ = _parse_np(ref["sentences"][0]["sent"].split())
        _, objects = scene[ref["image_id"]]
        total += 1
        hard += any(o["color"] == colour or o["shape"] == shape for o in objects)
    assert total >= 20 and hard / total >= 0.8, (hard, total)
    assert sum(r["no_target"] for r in refs if r["split"] == "val") / sum(r["split"] == "val" for r in refs) > 0.25


def test_refuses_to_overwrite_real_grefcoco(tmp_path):
    g = tmp_path / "refer_seg" / "grefcoco"
    g.mkdir(parents=True)
    (g / "grefs(unc).json").write_text("[]")
    with pytest.raises(FileExistsError, match="grefs"):
        write_synthetic_grefcoco(tmp_path, num_images={"train": 1, "val": 1, "testA": 1, "testB": 1})


def test_rerun_replaces_earlier_synthetic_images(tmp_path):
    write_synthetic_grefcoco(tmp_path, num_images={"train": 4, "val": 2, "testA": 1, "testB": 1})
    write_synthetic_grefcoco(tmp_path, num_images={"train": 2, "val": 1, "testA": 0, "testB": 0})
    pngs = list((tmp_path / "refer_seg/images/mscoco/images/train2014").glob("*.png"))
    assert len(pngs) == 3


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="colors"):
        write_synthetic_grefcoco(tmp_path, num_images={"train": 1}, colors=["red", "mauve"])
    with pytest.raises(ValueError, match="split"):
        write_synthetic_grefcoco(tmp_path, num_images={"dev": 1})


def test_cli_writes_and_reports(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--train", "3", "--val", "2", "--testA", "1", "--testB", "1",
                    "--image-size", "96", "--seed", "4"])
    printed = capsys.readouterr().out
    assert "train" in printed and "wrote" in printed
    instances = json.loads((tmp_path / "refer_seg/grefcoco/instances.json").read_text())
    assert len(instances["images"]) == 7 and instances["images"][0]["width"] == 96


def _absent_kinds(root: Path, split: str) -> list[str]:
    """Kind of each absent train ref, recomputed from its sentence and the image's annotated colours and shapes."""
    refs = json.loads((root / "refer_seg/grefcoco/grefs(unc).json").read_text())
    _, found_objects = synthetic.read_image_objects(root, split)
    objects = {image_id: [(o["color"], o["shape"]) for o in found] for image_id, found in found_objects.items()}
    kinds = []
    for ref in refs:
        if ref["split"] != split or not ref["no_target"]:
            continue
        colour, shape, _ = _parse_np(ref["sentences"][0]["sent"].split())
        found = objects[ref["image_id"]]
        shares = (any(c == colour for c, _ in found), any(s == shape for _, s in found))
        kinds.append({(True, True): "both", (True, False): "color", (False, True): "shape", (False, False): "easy"}[shares])
    return kinds


def test_negative_kinds_steer_train_hard_negatives_and_leave_val_alone(tmp_path):
    sizes = {"train": 60, "val": 12, "testA": 0, "testB": 0}
    write_synthetic_grefcoco(tmp_path / "a", num_images=sizes, seed=2)
    write_synthetic_grefcoco(tmp_path / "b", num_images=sizes, seed=2, split_options={"train": {"negative_kinds": {"color": 1}}})
    plain, steered = Counter(_absent_kinds(tmp_path / "a", "train")), Counter(_absent_kinds(tmp_path / "b", "train"))
    hard = ("both", "color", "shape")
    assert sum(plain.values()) == sum(steered.values()) > 40
    assert plain["color"] / sum(plain[k] for k in hard) < 0.5
    assert steered["color"] / sum(steered[k] for k in hard) > 0.9
    val = [
        [(r["file_name"], r["sentences"], r["no_target"]) for r in json.loads((d / "refer_seg/grefcoco/grefs(unc).json").read_text()) if r["split"] == "val"]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert val[0] == val[1] and len(val[0]) > 0
    manifest = json.loads((tmp_path / "b" / "synthetic_grefcoco.json").read_text())
    assert manifest["parameters"]["split_options"]["train"]["negative_kinds"] == {"color": 1}


def test_negative_kinds_are_checked(tmp_path):
    with pytest.raises(ValueError, match="negative_kinds"):
        write_synthetic_grefcoco(tmp_path, num_images={"train": 1}, split_options={"train": {"negative_kinds": {"easy": 1}}})