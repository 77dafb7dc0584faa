"""The commands delete or replace only files they provably wrote, inside the folder they were given, never through
a symbolic link; the files they write get the user's umask; summary.json accounts for every input entry."""

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsva_hf import hub
from gsva_hf import segment as command
from gsva_hf.data import synthetic
from gsva_hf.data.synthetic import IMAGE_SUBDIR, LABELS_NAME, write_synthetic_grefcoco

PHRASES = "the red circle; the cat"
FEW = {"train": 2, "val": 1, "testA": 0, "testB": 0}


@pytest.fixture()
def model_dir(saved_tiny_folder):
    return saved_tiny_folder


@pytest.fixture()
def umask_027():
    """A umask other than the usual 022, restored afterwards: files must come out 0640."""
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def image(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def exit_status(capsys, main, *argv):
    """A command's exit status and stderr, whether it returns the status or exits with it (a usage error)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def segment(capsys, *argv):
    return exit_status(capsys, command.main, *argv)


# ------------------------------------------------------------------------------------------ synthetic generator
def test_synthetic_rerun_deletes_no_file_a_labels_file_names(tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_grefcoco(root, num_images=FEW)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative, absolute = elsewhere / "x.txt", elsewhere / "y.txt"
    relative.write_text("keep")
    absolute.write_text("keep")
    labels = json.loads((root / LABELS_NAME).read_text())
    escape = "../" * (len(IMAGE_SUBDIR.parts) + 1) + "elsewhere/x.txt"
    labels["images"] += [
        {"id": 90, "split": "train", "file_name": escape},
        {"id": 91, "split": "train", "file_name": str(absolute)},
    ]
    (root / LABELS_NAME).write_text(json.dumps(labels))

    synthetic.main(["--out", str(root), "--train", "1", "--val", "1", "--testA", "0", "--testB", "0"])
    assert relative.read_text() == "keep" and absolute.read_text() == "keep"
    assert sorted(p.name for p in (root / IMAGE_SUBDIR).iterdir()) == [
        "COCO_train2014_000000000001.png",
        "COCO_train2014_000000000002.png",
    ]


def test_synthetic_refuses_links_and_images_it_did_not_write(tmp_path, capsys):
    root = tmp_path / "data"
    images = root / IMAGE_SUBDIR
    images.mkdir(parents=True)
    precious = tmp_path / "precious.png"
    precious.write_bytes(b"user data")
    (images / "COCO_train2014_000000000001.png").symlink_to(precious)
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(root), "--train", "2", "--val", "0", "--testA", "0", "--testB", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "COCO_train2014_000000000001.png is a symbolic link" in err
    assert precious.read_bytes() == b"user data"

    (images / "COCO_train2014_000000000001.png").unlink()
    (images / "COCO_train2014_000000000002.png").write_bytes(b"someone's image")
    with pytest.raises(FileExistsError, match="000000000002.png was not written by this generator"):
        write_synthetic_grefcoco(root, num_images=FEW)
    assert (images / "COCO_train2014_000000000002.png").read_bytes() == b"someone's image"

    forged = tmp_path / "forged"
    write_synthetic_grefcoco(forged, num_images=FEW)
    (forged / synthetic.MANIFEST_NAME).write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(FileExistsError, match="synthetic_grefcoco.json is not a manifest this generator wrote"):
        write_synthetic_grefcoco(forged, num_images=FEW)
    assert len(list((forged / IMAGE_SUBDIR).iterdir())) == 3


# ------------------------------------------------------------------------------------------ gsva-segment
def test_segment_refuses_a_summary_listing_a_users_file(tmp_path, capsys):
    picture = image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("four years of work")
    marker = {"written_by": command.WRITTEN_BY, "format": command.SUMMARY_FORMAT}
    (out / "summary.json").write_text(json.dumps({**marker, "images": [], "files": ["thesis.docx"]}))
    code, err = segment(capsys, picture, PHRASES, "--out", out)
    assert code == 2 and "'thesis.docx'" in err and "refusing to delete it" in err
    assert (out / "thesis.docx").read_text() == "four years of work"


def test_segment_never_writes_through_a_link(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    image(folder / "a.png")
    user_docs = tmp_path / "user_docs"
    user_docs.mkdir()
    (user_docs / "result.json").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to(user_docs, target_is_directory=True)
    code, err = segment(capsys, folder, PHRASES, "--model", model_dir, "--out", out)
    assert code == 2 and "a.png is a symbolic link" in err
    assert sorted(os.listdir(user_docs)) == ["result.json"] and (user_docs / "result.json").read_text() == "mine"

    (out / "a.png").unlink()
    (out / "summary.json").symlink_to(user_docs / "result.json")
    code, err = segment(capsys, folder, PHRASES, "--model", model_dir, "--out", out)
    assert code == 2 and "summary.json is a symbolic link" in err
    assert (user_docs / "result.json").read_text() == "mine"


def test_segment_names_a_folder_where_it_writes_a_file(model_dir, tmp_path, capsys):
    picture = image(tmp_path / "a.png")
    out = tmp_path / "out"
    (out / "overlay.png").mkdir(parents=True)
    code, err = segment(capsys, picture, PHRASES, "--model", model_dir, "--out", out)
    assert code == 2 and "overlay.png is a folder" in err

    folder = tmp_path / "images"
    folder.mkdir()
    image(folder / "b.png")
    out = tmp_path / "out_folder"
    (out / "b.png" / "result.json").mkdir(parents=True)
    code, err = segment(capsys, folder, PHRASES, "--model", model_dir, "--out", out)
    assert code == 2 and "b.png/result.json is a folder" in err


def test_segment_lists_skipped_entries_in_the_summary(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    image(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "more").mkdir()
    out = tmp_path / "out"
    code, err = segment(capsys, folder, PHRASES, "--model", model_dir, "--out", out)
    assert code == 0 and "notes.txt" in err
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    assert [(Path(s["file"]).name, s["reason"].split(" (")[0]) for s in skipped] == [
        ("more", "a folder"),
        ("notes.txt", "not an image file"),
    ]
    # a rerun accepts the folder it wrote (and replaces its files)
    assert segment(capsys, folder, PHRASES, "--model", model_dir, "--out", out)[0] == 0


# ------------------------------------------------------------------------------------------ file modes
def test_exported_and_pushed_weights_follow_the_umask(tiny_model, tiny_processor, tmp_path, umask_027, capsys):
    from gsva_hf.training import export_model

    exported = export_model(tiny_model, tiny_processor, tmp_path / "final")
    assert mode(exported / "model.safetensors") == umask_027 == mode(exported / "config.json")

    out = tmp_path / "layout"
    assert exit_status(capsys, hub.main, exported, "you/gsva", "--dry-run", "--out", out)[0] == 0
    assert {name: mode(out / name) for name in ("model.safetensors", "config.json")} == dict.fromkeys(
        ("model.safetensors", "config.json"), umask_027
    )


def test_converted_weights_follow_the_umask(tmp_path, umask_027, capsys):
    from gsva_hf.convert_gsva_to_hf import main as convert

    out = tmp_path / "tiny"
    assert exit_status(capsys, convert, "--random", "--preset", "tiny", "--output", out)[0] == 0
    assert mode(out / "model.safetensors") == umask_027 == mode(out / "config.json")


def test_checkpoint_weights_follow_the_umask_and_a_failed_save_keeps_an_older_folder(tmp_path, umask_027, monkeypatch):
    from transformers import TrainingArguments

    from gsva_hf.training import GSVATrainer

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = GSVATrainer(model=torch.nn.Sequential(torch.nn.Linear(4, 4)), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.state.global_step = 3
    trainer._save_checkpoint(trainer.model, None)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert mode(checkpoint / "model.safetensors") == umask_027

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="existed before this save and was left as it is"):
        trainer._save_checkpoint(trainer.model, None)
    assert (checkpoint / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ gsva-push --overwrite
def test_push_overwrite_checks_its_marker_and_never_deletes_through_a_link(saved_tiny_folder, tmp_path, capsys):
    argv = [saved_tiny_folder, "you/gsva", "--dry-run", "--overwrite", "--out"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    users_file = tmp_path / "some_file"
    users_file.write_text("Written by gsva-push for you/gsva")
    (busy / hub.PUSH_MARKER).symlink_to(users_file)
    code, err = exit_status(capsys, hub.main, *argv, busy)
    assert code == 2 and "its .gsva-push is a symbolic link" in err
    (busy / hub.PUSH_MARKER).unlink()
    (busy / hub.PUSH_MARKER).write_text("my own notes on pushing")
    code, err = exit_status(capsys, hub.main, *argv, busy)
    assert code == 2 and "does not hold the text gsva-push writes" in err
    assert (busy / "notes.txt").read_text() == "keep me"

    layout = tmp_path / "layout"
    assert exit_status(capsys, hub.main, *argv[:-2], "--out", layout)[0] == 0
    link = tmp_path / "link"
    link.symlink_to(layout, target_is_directory=True)
    code, err = exit_status(capsys, hub.main, *argv, link)
    assert code == 2 and f"--out {link} is a symbolic link" in err
    assert (layout / hub.PUSH_MARKER).is_file() and (layout / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ presets
def test_presets_leave_other_folders_alone(tmp_path):
    from gsva_hf.presets import write_presets

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tool.py").write_text("x = 1\n")
    write_presets(tmp_path)
    assert (tmp_path / "mine" / "tool.py").read_text() == "x = 1\n"
    assert not list((tmp_path / "gsva-tiny").glob("*.py"))
