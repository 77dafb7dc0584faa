"""gsva-segment as a user runs it: masks, overlay and JSON, bad images, output folders, undecided targets, the overlay;
the image loader's grey levels and limits; eval_hf's checks before evaluating; checkpoints on a full disk."""

import errno
import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gsva_hf import overlay as drawing
from gsva_hf import segment as command
from processing_gsva import SegmentationResult, SegmentedTarget, load_image
from tests.conftest import exit_status

PHRASES = "the red circle; the cat"
RNG = np.random.default_rng(1)


@pytest.fixture()
def model_dir(saved_tiny_folder):
    return saved_tiny_folder


def noise_image(path, size=(30, 40), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path)
    return path


def run(capsys, *argv):
    code = command.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def test_help_shows_every_default_in_one_flag_style(capsys):
    with pytest.raises(SystemExit):
        command.main(["--help"])
    text = capsys.readouterr().out
    options = [word for word in text.split() if word.startswith("--") and len(word) > 2]
    assert options and all("_" not in word for word in options)
    for flag in ("--batch-size", "--max-new-tokens", "--threshold", "--dtype", "--model", "--trust-remote-code"):
        assert flag in text
    # Every flag with a value by default shows it; unset values and off switches show none.
    parser = command.build_parser()
    shown = [a for a in parser._actions if a.option_strings and a.default is not None and a.default is not False and a.default != "==SUPPRESS=="]
    assert len(shown) >= 7 and text.count("(default:") == len(shown)


# ------------------------------------------------------------------------------------------ results and folders
def test_bad_image_costs_only_itself_and_names_never_collide(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    noise_image(folder / "a.png", (30, 40), 1)
    noise_image(folder / "a.jpg", (25, 20), 2)
    noise_image(folder / "c.png", (16, 16), 3)
    whole = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(whole, format="PNG")
    (folder / "b_truncated.png").write_bytes(whole.getvalue()[:-40])
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, err = run(capsys, folder, PHRASES, "--model", model_dir, "--out", out, "--batch-size", "2")
    assert code == 1
    assert "b_truncated.png" in err and "notes.txt" in err
    summary = json.loads((out / "summary.json").read_text())
    status = {entry["image"].split("/")[-1]: entry for entry in summary["images"]}
    assert sorted(status) == ["a.jpg", "a.png", "b_truncated.png", "c.png"]
    assert status["b_truncated.png"]["status"] == "failed" and "b_truncated.png" in status["b_truncated.png"]["problems"][0]
    for name, size in (("a.png", (30, 40)), ("a.jpg", (25, 20)), ("c.png", (16, 16))):
        assert status[name]["status"] == "ok"
        record = json.loads((out / name / "result.json").read_text())
        assert record["image"].endswith(name) and [t["asked"] for t in record["targets"]] == ["the red circle", "the cat"]
        assert all(t["rle"]["size"] == list(size) for t in record["targets"])
        with Image.open(out / name / "overlay.png") as shown:
            assert max(shown.size) >= 512
    assert not (out / "b_truncated.png").exists()


def test_rerun_removes_its_own_stale_files_and_refuses_foreign_ones(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    noise_image(folder / "a.png", seed=1)
    noise_image(folder / "c.png", seed=2)
    out = tmp_path / "out"
    assert run(capsys, folder, PHRASES, "--model", model_dir, "--out", out)[0] == 0
    first = set(json.loads((out / "summary.json").read_text())["files"])
    assert {"c.png/result.json", "c.png/overlay.png"} <= first
    (folder / "c.png").unlink()
    assert run(capsys, folder, PHRASES, "--model", model_dir, "--out", out)[0] == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == set(json.loads((out / "summary.json").read_text())["files"]) | {"summary.json"}
    assert not (out / "c.png").exists()

    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit) as exit_info:
        command.main([str(folder), PHRASES, "--model", str(model_dir), "--out", str(out)])
    assert exit_info.value.code == 2 and "mine.txt" in capsys.readouterr().err
    assert (out / "a.png" / "result.json").is_file() and (out / "mine.txt").is_file()


class DroppingModel:
    """The real model, but each result loses its last target (what a cut or unmatched answer looks like)."""

    def __init__(self, model):
        self.model = model

    def segment(self, processor, images, **kwargs):
        results = self.model.segment(processor, images, **kwargs)
        for result in results:
            result.targets = result.targets[:-1]
        return results


def test_an_undecided_target_is_an_error(model_dir, tmp_path, capsys, monkeypatch):
    image = noise_image(tmp_path / "a.png")
    real = command.load_gsva_pinned

    def dropping(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        return DroppingModel(model), processor

    monkeypatch.setattr(command, "load_gsva_pinned", dropping)
    code, err = run(capsys, image, "--targets", PHRASES, "--model", model_dir, "--out", tmp_path / "dropped")
    assert code == 1 and "2 targets asked but 1 decided" in err and "the cat" in err
    monkeypatch.setattr(command, "load_gsva_pinned", real)
    # A question whose answer is cut at --max-new-tokens: the processor's warning becomes an error.
    code, err = run(capsys, image, "what is here?", "--model", model_dir, "--out", tmp_path / "cut", "--max-new-tokens", "1")
    assert code == 1 and "max_new_tokens" in err
    record = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert record["question"] == "what is here?" and record["problems"]


def test_query_parser_is_shared_by_cli_and_demo():
    assert command.parse_query("the red circle; the blue square") == {"targets": ["the red circle", "the blue square"]}
    assert command.parse_query(" a \n b ; c ") == {"targets": ["a", "b", "c"]}
    assert command.parse_query("What is left of the red circle?") == {"text": "What is left of the red circle?"}
    assert command.parse_query("is it red?", allow_question=False) == {"targets": ["is it red?"]}
    with pytest.raises(ValueError, match="type a sentence"):
        command.parse_query(" ;\n ")


# ------------------------------------------------------------------------------------------ overlay
def lab(rgb):
    """sRGB (0..255) -> CIELAB, D65, written out from the standard definitions."""
    out = []
    for colour in np.asarray(rgb, float).reshape(-1, 3):
        channels = []
        for value in colour / 255:
            channels.append(value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4)
        r, g, b = channels
        x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
        y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
        z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

        def f(t):
            return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

        out.append((116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))))
    return np.array(out)


def delta_e(a, b):
    return float(np.linalg.norm(lab(a)[0] - lab(b)[0]))


def shapes():
    image = np.full((128, 128, 3), 120, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    circle = (yy - 40) ** 2 + (xx - 40) ** 2 < 18**2
    square = (yy > 70) & (yy < 110) & (xx > 20) & (xx < 60)
    green = (yy > 70) & (yy < 110) & (xx > 75) & (xx < 115)
    image[circle], image[square], image[green] = (220, 30, 30), (30, 60, 220), (40, 190, 60)
    targets = [
        SegmentedTarget("the red circle", False, torch.from_numpy(circle), 0.9, 0.8),
        SegmentedTarget("the blue square", False, torch.from_numpy(square), 0.8, 0.7),
        SegmentedTarget("the yellow star", True, torch.zeros(128, 128, dtype=torch.bool), 0.7, 0.0),
    ]
    return Image.fromarray(image), SegmentationResult("answer", targets, [])


def test_overlay_colours_stand_apart_outlines_and_a_readable_legend():
    image, result = shapes()
    picture = np.asarray(drawing.overlay(image, result))
    colours = drawing.target_colours(image, result)
    scale = 4  # 128 px is shown at 512 px
    assert picture.shape[1] == 128 * scale and picture.shape[0] > 128 * scale + 3 * 18
    original = np.asarray(image, float)
    shown = picture[: 128 * scale, : 128 * scale].astype(float)
    legend = picture[128 * scale :]
    for target, colour in zip(result.targets[:2], colours[:2]):
        mask = target.mask.numpy()
        under = original[mask].mean(0)
        assert delta_e(colour, under) > 30
        big = mask.repeat(scale, 0).repeat(scale, 1)
        padded = np.pad(big, 1)
        edge = big & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
        assert edge.sum() > 100 and np.all(shown[edge] == colour)  # the outline sits on the mask's border
        assert delta_e(shown[big & ~edge].mean(0), under) > 30  # the tint itself stands apart
        swatch = np.all(legend == colour, axis=-1).sum()
        assert swatch >= 14 * 14  # a swatch of at least the 14 px font size
    assert delta_e(colours[0], colours[1]) > 30
    for other in ((40, 190, 60), (120, 120, 120)):  # tints do not look like the green object or the background
        for target, colour in zip(result.targets[:2], colours[:2]):
            tint = 0.5 * original[target.mask.numpy()].mean(0) + 0.5 * np.array(colour)
            assert delta_e(tint, other) > 20
    dark = (legend.sum(-1) < 200).any(axis=1)
    lines = np.flatnonzero(np.diff(dark.astype(int)) == 1)
    assert len(lines) == 3  # one legend line per target, the rejected one included


# ------------------------------------------------------------------------------------------ images
def grey(image):
    array = np.asarray(load_image(image))
    assert array.dtype == np.uint8 and np.all(array[..., 0] == array[..., 2])
    return array[..., 0].reshape(-1).tolist()


def saved(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    buffer.seek(0)
    return Image.open(buffer)


def test_every_mode_maps_to_its_grey_levels(tmp_path):
    sixteen = np.array([[0, 257, 32768, 65535]], np.uint16)
    assert grey(saved(sixteen, "PNG")) == [0, 1, 128, 255]  # I;16: / 65535
    assert grey(saved(sixteen, "TIFF")) == [0, 1, 128, 255]
    pgm = tmp_path / "sixteen.pgm"
    pgm.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 1000, 65535], ">u2").tobytes())
    with Image.open(pgm) as opened:
        assert opened.mode == "I"
    assert grey(pgm) == [0, 4, 255]  # 1000 * 255 / 65535 = 3.89
    twelve = tmp_path / "twelve.pgm"  # maxval 4095: Pillow stretches to 16 bits (2048 -> 32776)
    twelve.write_bytes(b"P5\n3 1\n4095\n" + np.array([0, 2048, 4095], ">u2").tobytes())
    assert grey(twelve) == [0, 128, 255]
    wide = np.array([[0, 2**30, 2**31 - 1]], np.int32)
    assert saved(wide, "TIFF").mode == "I" and grey(saved(wide, "TIFF")) == [0, 128, 255]  # / (2**31 - 1)
    assert grey(saved(np.array([[0, 100, 255]], np.int32), "TIFF")) == [0, 100, 255]  # 8-bit range as is
    assert grey(saved(np.array([[-5, 300, 65535]], np.int32), "TIFF")) == [0, 1, 255]
    assert grey(saved(np.array([[0.0, 0.5, 1.0]], np.float32), "TIFF")) == [0, 128, 255]
    assert grey(np.array([[0.0, 100.4, 300.0]], np.float32)) == [0, 100, 255]
    assert grey(np.array([[0, 255]], np.uint16)) == [0, 1]  # uint16 is 16-bit whatever the values
    assert grey(np.array([[False, True]])) == [0, 255]
    assert grey(Image.fromarray(np.array([[3, 200]], np.uint8))) == [3, 200]


def header_only_png(path, width, height):
    """A PNG whose header announces `width` x `height` (no pixel data: the limits must act on the header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
    return path


def test_size_and_aspect_limits_name_the_file_its_size_and_the_limit(tmp_path, tiny_processor, monkeypatch):
    with pytest.raises(ValueError, match=r"big\.png.*8000x6000 \(48\.0 megapixels\).*limit of 40 megapixels"):
        load_image(header_only_png(tmp_path / "big.png", 8000, 6000))
    with pytest.raises(ValueError, match=r"bomb\.png.*400000000 pixels.*limit is 40 megapixels"):
        load_image(header_only_png(tmp_path / "bomb.png", 20000, 20000))
    with pytest.raises(ValueError, match=r"2049x1, an aspect ratio of 2049:1, beyond the limit of 2048:1"):
        load_image(np.zeros((1, 2049, 3), np.uint8))
    # The processor holds each image to its own SAM's limit: 2 x longest edge (128 for the tiny model) to 1.
    tiny_processor(images=[np.zeros((1, 256, 3), np.uint8)], text=["what?"])  # at the limit: fine
    with pytest.raises(ValueError, match=r"image 0 is 257x1, an aspect ratio of 257:1, beyond this model's limit of 256:1"):
        tiny_processor(images=[load_image(np.zeros((1, 257, 3), np.uint8))], text=["what?"])
    with pytest.raises(Exception):  # past it, SAM's own resize breaks: the limit is where it breaks
        tiny_processor.sam_image_processor([Image.new("RGB", (257, 1))], return_tensors="pt")


# ------------------------------------------------------------------------------------------ eval_hf
def test_eval_refuses_missing_images_and_unwritable_output_before_evaluating(tmp_path, monkeypatch, capsys):
    import eval_hf
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    data = tmp_path / "data"
    write_synthetic_grefcoco(data, num_images={"train": 0, "val": 3, "testA": 0, "testB": 0}, seed=5)
    images = sorted((data / "refer_seg" / "images").rglob("*.png")) + sorted((data / "refer_seg" / "images").rglob("*.jpg"))
    images[0].unlink()
    images[1].write_bytes(b"not an image")
    base = ["--model", str(tmp_path / "no_model_needed"), "--dataset_dir", str(data), "--output", str(tmp_path / "e.json")]
    def refused(argv) -> str:
        assert exit_status(eval_hf.main, argv) == 2
        return capsys.readouterr().err

    err = refused(base)
    assert "2 of 3 image files cannot be read" in err and images[0].name in err and images[1].name in err

    noise_image(images[0], (128, 128))
    noise_image(images[1], (128, 128))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert re.search(r"cannot write the evaluation output .*a_file/e\.json.*--output", refused(base[:-1] + [str(blocker / "e.json")]))

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(eval_hf.tempfile, "NamedTemporaryFile", read_only)
    # The default output is in the working folder, named after the model as given, never inside the model folder.
    monkeypatch.chdir(tmp_path)
    err = refused(["--model", "models/read_only", "--dataset_dir", str(data)])
    assert re.search(r"output eval_models_read_only_grefcoco_unc_val_teacher_forced\.json .*--output", err)


# ------------------------------------------------------------------------------------------ checkpoints
def test_disk_full_while_saving_leaves_no_checkpoint_and_says_so(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from gsva_hf.training import GSVATrainer

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = GSVATrainer(model=torch.nn.Sequential(torch.nn.Linear(4, 4)), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.state.global_step = 7
    real_save = torch.save

    def full_disk(obj, target, *a, **k):
        real_save(obj, target, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on device while saving checkpoint .*checkpoint-7") as info:
        trainer._save_checkpoint(trainer.model, None)
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "run" / "checkpoint-7").exists()

    def torch_zip_error(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 746496 vs 746388")

    monkeypatch.setattr(torch, "save", torch_zip_error)
    with pytest.raises(OSError, match="no space left on device while saving checkpoint"):
        trainer._save_checkpoint(trainer.model, None)
    assert not (tmp_path / "run" / "checkpoint-7").exists()
    monkeypatch.setattr(torch, "save", real_save)
    trainer._save_checkpoint(trainer.model, None)
    assert (tmp_path / "run" / "checkpoint-7" / "trainer_state.json").is_file()


def test_phrases_and_devices_that_cannot_work_are_usage_errors(model_dir, tmp_path, capsys):
    image = noise_image(tmp_path / "one.png")
    for extra, said in (
        (["...; ."], "more than full stops"),
        (["the red circle", "--device", "nonsense"], "cannot load the model with --device nonsense"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            command.main([str(image), *extra, "--model", str(model_dir), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_segment_command_writes_masks_overlay_and_json(tiny_model, tiny_processor, tmp_path):
    from pycocotools import mask as mask_utils

    from gsva_hf import segment as command

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a.png", (30, 40)), ("b.jpg", (25, 20))):
        Image.fromarray(RNG.integers(0, 255, size + (3,), dtype=np.uint8)).save(folder / name)
    code = command.main([str(folder), "--targets", "the red circle; the cat", "--model", str(model_dir), "--out", str(tmp_path / "out")])
    assert code == 0
    for stem, size in (("a.png", (30, 40)), ("b.jpg", (25, 20))):
        record = json.loads((tmp_path / "out" / stem / "result.json").read_text())
        assert record["asked"] == [t["asked"] for t in record["targets"]] == ["the red circle", "the cat"]
        with Image.open(tmp_path / "out" / stem / "overlay.png") as shown:
            assert shown.width >= size[1]
        for target in record["targets"]:
            decoded = mask_utils.decode({"size": target["rle"]["size"], "counts": target["rle"]["counts"].encode()})
            assert decoded.shape == size and int(decoded.sum()) == target["area"]
            if not target["rejected"]:
                with Image.open(tmp_path / "out" / stem / target["mask_png"]) as mask_file:
                    png = np.asarray(mask_file) > 0
                assert np.array_equal(png, decoded.astype(bool))
