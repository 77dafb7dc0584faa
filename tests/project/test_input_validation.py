"""Untrusted inputs are checked before anything is decoded or allocated, and dataset pixels always agree with
their annotations (EXIF orientation), the same in training, evaluation and inference."""

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gsva_hf import segment as command
from gsva_hf.loading import CheckpointFileError, IncompleteCheckpointError, load_gsva
from processing_gsva import load_image
from tests.conftest import REPO

BUNDLED = REPO / "gsva_hf" / "assets" / "gsva-tiny-synthetic"
ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 0, "val": 3, "testA": 0, "testB": 0}, seed=5, image_size=64)
    return root


def image_files(root):
    return sorted((root / "refer_seg" / "images" / "mscoco" / "images" / "train2014").glob("*.png"))


def exif_tagged_copy(root, destination, orientation=6):
    """The same tree with an EXIF orientation tag added to every image; the stored pixels are unchanged."""
    shutil.copytree(root, destination)
    for path in image_files(destination):
        with Image.open(path) as image:
            pixels = image.copy()
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        pixels.save(path, exif=exif.tobytes())
        with Image.open(path) as check:
            assert check.getexif()[ORIENTATION] == orientation
    return destination


# ------------------------------------------------------------------------------------------ EXIF and annotations
def test_exif_tagged_dataset_gives_the_same_samples_and_batches(synthetic_val, tmp_path, tiny_processor):
    from gsva_hf.data.collator import GSVACollator
    from gsva_hf.data.refer_seg import ReferSegValDataset

    tagged = exif_tagged_copy(synthetic_val, tmp_path / "tagged")
    original = ReferSegValDataset(synthetic_val, "grefcoco|unc|val")
    rotated = ReferSegValDataset(tagged, "grefcoco|unc|val")
    collate = GSVACollator(tiny_processor)
    for index in range(len(original)):
        a, b = original[index], rotated[index]
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.masks, b.masks)
        first, second = collate([a]), collate([b])
        for key, value in first.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, second[key]), key


def test_dataset_images_are_as_stored_and_user_images_upright(tmp_path):
    from gsva_hf.data.images import open_dataset_image
    from gsva_hf.data.sample import Sample

    stored = np.zeros((10, 30, 3), np.uint8)
    stored[:, :5] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "tagged.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    assert load_image(path).size == (10, 30)  # inference: the user's photo is turned upright
    dataset_image = open_dataset_image(path)
    assert dataset_image.size == (30, 10) and np.array_equal(np.asarray(dataset_image), stored)
    # A second pass through the processor's loader keeps it as it is: nothing in it asks for a rotation.
    assert np.array_equal(np.asarray(load_image(dataset_image)), stored)
    # A Sample made by any reader from a lazily opened, tagged file drops the tag the same way.
    sample = Sample(image=Image.open(path), rounds=[("q", "a")], masks=np.zeros((0, 10, 30), bool))
    assert np.array_equal(np.asarray(load_image(sample.image).convert("RGB")), stored)


# ------------------------------------------------------------------------------------------ corrupt EXIF blocks
def corrupt_exif_jpeg(path):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (200, 20, 20)).save(buffer, "JPEG")
    data = buffer.getvalue()
    payload = b"Exif\x00\x00" + b"XX\x00\x2a" + b"\xff" * 8  # neither "II" nor "MM": not a TIFF block
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(data[:2] + app1 + data[2:])
    return path


def corrupt_exif_png(path):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (20, 200, 20)).save(buffer, "PNG")
    data = buffer.getvalue()
    payload = b"MM\x00\x2a\x00"  # a TIFF header cut inside its IFD offset (Pillow raises struct.error)
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


@pytest.mark.parametrize("writer", [corrupt_exif_jpeg, corrupt_exif_png])
def test_corrupt_exif_is_the_projects_error_naming_the_file(writer, tmp_path):
    path = writer(tmp_path / ("bad.jpg" if writer is corrupt_exif_jpeg else "bad.png"))
    with pytest.raises(ValueError, match="bad"):
        load_image(path)
    with Image.open(path) as opened:
        converted = opened.convert("RGB")  # a plain image that still carries the corrupt block
    with pytest.raises(ValueError, match="upload"):
        load_image(converted, name="upload")


def test_segment_goes_on_after_a_corrupt_exif_file(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    corrupt_exif_jpeg(folder / "a_bad.jpg")
    shutil.copyfile(BUNDLED / "example.png", folder / "b_good.png")
    out = tmp_path / "out"
    code = command.main([str(folder), "the red circle", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "a_bad.jpg" in err
    summary = json.loads((out / "summary.json").read_text())
    status = {base_name(entry["image"]): entry["status"] for entry in summary["images"]}
    assert status == {"a_bad.jpg": "failed", "b_good.png": "ok"}


def base_name(text):
    return text.replace("\\", "/").rsplit("/", 1)[-1]


def test_model_segment_raises_the_projects_error_for_corrupt_exif(tmp_path):
    model, processor = load_gsva(BUNDLED)
    with Image.open(corrupt_exif_jpeg(tmp_path / "bad.jpg")) as opened:
        converted = opened.convert("RGB")
    with pytest.raises(ValueError, match="EXIF"):
        model.segment(processor, converted, targets=["the red circle"])


# ------------------------------------------------------------------------------------------ configs before building
@pytest.fixture()
def model_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED, folder)
    return folder


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config = change(config)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: {**c, "text_config": None}, "text_config"),
        (lambda c: {k: v for k, v in c.items() if k != "text_config"}, "text_config"),
        (lambda c: {k: v for k, v in c.items() if k != "sam_config"}, "sam_config"),
        (lambda c: {**c, "text_config": {**c["text_config"], "num_hidden_layers": 1_000_000}}, "num_hidden_layers"),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "hidden_size": "64"}}, "hidden_size"),
        (lambda c: [], "JSON object"),
    ],
)
def test_bad_config_is_refused_before_building(model_copy, change, field, monkeypatch):
    from configuration_gsva import GSVAConfig
    from modeling_gsva import GSVAForCausalLM

    path = edit_config(model_copy, change)

    def never(*args, **kwargs):
        raise AssertionError("a model was built from a config that should have been refused")

    monkeypatch.setattr(GSVAForCausalLM, "__init__", never)
    with pytest.raises(ValueError, match=field) as caught:
        load_gsva(model_copy)
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match=field):
        GSVAConfig.from_pretrained(model_copy)


def test_config_disagreeing_with_the_weights_is_refused_before_allocating(model_copy, monkeypatch):
    from modeling_gsva import GSVAForCausalLM

    edit_config(model_copy, lambda c: {**c, "text_config": {**c["text_config"], "num_hidden_layers": 900}})
    monkeypatch.setattr(GSVAForCausalLM, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    with pytest.raises(IncompleteCheckpointError, match=r"missing \(would be drawn at random\): model\.language_model\.layers"):
        load_gsva(model_copy)


def test_segment_command_names_a_bad_config(model_copy, tmp_path, capsys):
    edit_config(model_copy, lambda c: {**c, "text_config": None})
    with pytest.raises(SystemExit) as exited:
        command.main([str(BUNDLED / "example.png"), "the red circle", "--model", str(model_copy), "--out", str(tmp_path / "o")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "text_config" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ annotation sizes
def test_claimed_image_size_is_checked_before_any_mask_is_decoded(synthetic_val, tmp_path, monkeypatch):
    from pycocotools import mask as coco_mask

    from gsva_hf.data.refer import ReferDataError
    from gsva_hf.data.refer_seg import ReferSegValDataset

    root = shutil.copytree(synthetic_val, tmp_path / "huge")
    instances_path = root / "refer_seg" / "grefcoco" / "instances.json"
    instances = json.loads(instances_path.read_text())
    first = min(instances["images"], key=lambda entry: entry["id"])
    first["height"] = first["width"] = 60000
    instances_path.write_text(json.dumps(instances))
    monkeypatch.setattr(coco_mask, "decode", lambda *a, **k: pytest.fail("a mask was decoded before the size check"))
    dataset = ReferSegValDataset(root, "grefcoco|unc|val")
    with pytest.raises(ReferDataError, match=r"grefcoco image \d+ .*instances\.json says 60000x60000 .*over the limit") as caught:
        dataset[0]
    assert first["file_name"] in str(caught.value)


def test_claimed_size_must_match_the_file_header(synthetic_val, tmp_path):
    from gsva_hf.data.refer import ReferDataError
    from gsva_hf.data.refer_seg import ReferSegValDataset

    root = shutil.copytree(synthetic_val, tmp_path / "off")
    path = image_files(root)[0]
    Image.new("RGB", (65, 64)).save(path)  # one column wider than instances.json says
    dataset = ReferSegValDataset(root, "grefcoco|unc|val")
    with pytest.raises(ReferDataError, match=r"is 64x65 but instances\.json says 64x64"):
        dataset[0]


# ------------------------------------------------------------------------------------------ safetensors headers
def write_header(path, header: bytes, length: int | None = None, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: write_header(p, b"{}", length=1 << 60), "header claims"),
        (lambda p: write_header(p, json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}).encode()), "data_offsets"),
        (lambda p: write_header(p, json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4]}}).encode(), data=b"\0" * 4), "needs"),
        (lambda p: write_header(p, b"[1, 2]"), "JSON object"),
        (lambda p: p.write_bytes(b"\x01"), "too short"),
    ],
)
def test_hostile_safetensors_header_is_refused_naming_the_file(model_copy, make, expected, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    make(weights)
    with pytest.raises(CheckpointFileError, match=expected) as caught:
        load_gsva(model_copy)
    assert str(weights) in str(caught.value)
    with pytest.raises(SystemExit) as exited:
        command.main([str(BUNDLED / "example.png"), "the red circle", "--model", str(model_copy), "--out", str(tmp_path / "o")])
    assert exited.value.code == 2 and "model.safetensors" in capsys.readouterr().err
