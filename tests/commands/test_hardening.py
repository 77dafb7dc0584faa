"""Every loader is strict, counts are refused below 1, outputs are checked before the model runs, damaged
checkpoints and full disks are named: train_hf.py, gsva-push, model.segment, the pipeline, gsva-segment, eval_hf."""

import errno
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train_hf
from gsva_hf import hub
from gsva_hf import segment as command
from gsva_hf.loading import IncompleteCheckpointError, NonFiniteError
from tests.conftest import exit_status

DROPPED = "model.sam.mask_decoder.iou_token.weight"


def rewrite_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def image(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def errors(capsys, main, *argv):
    """Exit status and stderr of a command."""
    code = exit_status(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 4, "val": 0, "testA": 0, "testB": 0}, seed=3)
    return root


def train_args(data_dir, model_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_dir", str(data_dir), "--dataset", "refer_seg",
        "--sample_rates", "1", "--refer_seg_data", "grefcoco", "--output_dir", str(output_dir), "--use_cpu", "true",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--seed", "7", "--val_dataset", "",
        "--lora_r", "4", "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ strict loading
def test_train_hf_refuses_a_folder_with_missing_or_non_finite_tensors(saved_tiny_folder, synthetic_dir, tmp_path, capsys):
    model_args = train_hf.ModelArguments(model_name_or_path=str(saved_tiny_folder))
    training_args = train_hf.GSVATrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    original = load_file(saved_tiny_folder / "model.safetensors")[DROPPED]
    rewrite_weights(saved_tiny_folder, lambda t: t.pop(DROPPED))
    with pytest.raises(IncompleteCheckpointError, match=rf"{saved_tiny_folder}: .*missing .*{DROPPED}"):
        train_hf.load_model(model_args, training_args)
    # The command ends with one line naming the folder and the key, before training anything.
    code, err = errors(capsys, train_hf.main, *train_args(synthetic_dir, saved_tiny_folder, tmp_path / "run"))
    assert code == 2 and "Traceback" not in err and str(saved_tiny_folder) in err and DROPPED in err
    assert not (tmp_path / "run" / "final").exists() and not list((tmp_path / "run").glob("checkpoint-*"))

    rewrite_weights(saved_tiny_folder, lambda t: t.update({DROPPED: torch.full_like(original, float("nan"))}))
    with pytest.raises(NonFiniteError, match=rf"--model_name_or_path {saved_tiny_folder}: .*{DROPPED} \(nan"):
        train_hf.load_model(model_args, training_args)


def test_push_refuses_a_folder_missing_a_tensor_before_writing(saved_tiny_folder, tmp_path, capsys):
    rewrite_weights(saved_tiny_folder, lambda t: t.pop(DROPPED))
    layout = tmp_path / "layout"
    code, err = errors(capsys, hub.main, saved_tiny_folder, "you/gsva", "--dry-run", "--out", layout)
    assert code == 2 and str(saved_tiny_folder) in err and DROPPED in err and "missing" in err
    assert not layout.exists()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """Two different random bases, and a one-step LoRA run on the first that saved checkpoint-1 and exported."""
    from configuration_gsva import GSVAConfig
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("bases")
    processor = GSVAProcessor.from_pretrained(TINY)
    bases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = root / f"base{seed}"
        GSVAForCausalLM(GSVAConfig.from_pretrained(TINY)).save_pretrained(folder)
        processor.save_pretrained(folder)
        bases.append(folder)
    run_dir = root / "run"
    train_hf.main(train_args(synthetic_dir, bases[0], run_dir))
    assert (run_dir / "final" / "config.json").is_file()
    return bases, run_dir / "checkpoint-1"


def test_a_checkpoint_exports_only_onto_the_base_it_was_trained_from(trained, synthetic_dir, tmp_path, capsys):
    (base, other), checkpoint = trained
    export = ("--export_only", "true", "--resume_from_checkpoint", str(checkpoint))
    code, err = errors(capsys, train_hf.main, *train_args(synthetic_dir, other, tmp_path / "wrong", *export))
    assert code == 2 and "Traceback" not in err
    assert f"trained from the base model {base}" in err and f"--model_name_or_path {other} differs" in err
    assert not (tmp_path / "wrong" / "final").exists()
    # Its own base exports, and resuming on the other base is refused the same way.
    train_hf.main(train_args(synthetic_dir, base, tmp_path / "right", *export))
    assert (tmp_path / "right" / "final" / "model.safetensors").is_file()
    resume = ("--max_steps", "2", "--resume_from_checkpoint", str(checkpoint))
    code, err = errors(capsys, train_hf.main, *train_args(synthetic_dir, other, tmp_path / "resumed", *resume))
    assert code == 2 and f"--model_name_or_path {other} differs" in err


def test_a_checkpoint_without_a_base_record_is_said_and_still_resumes(trained, synthetic_dir, tmp_path, capsys):
    (base, _), checkpoint = trained
    old = tmp_path / "old" / "checkpoint-1"
    shutil.copytree(checkpoint, old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["BaseModelRecord"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    train_hf.main(train_args(synthetic_dir, base, tmp_path / "old", "--max_steps", "2", "--resume_from_checkpoint", str(old)))
    assert "does not record the base model" in capsys.readouterr().err
    saved = json.loads((tmp_path / "old" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["BaseModelRecord"]["args"]["model_name_or_path"] == str(base)


@pytest.mark.parametrize("content", ['{"global_step": 1, "log_hist', "[1, 2]"])
def test_a_damaged_trainer_state_is_named(trained, synthetic_dir, tmp_path, capsys, content):
    from gsva_hf.training import check_checkpoint_complete

    (base, _), checkpoint = trained
    damaged = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, damaged)
    (damaged / "trainer_state.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(damaged / "trainer_state.json"))):
        check_checkpoint_complete(damaged)
    export = ("--export_only", "true", "--resume_from_checkpoint", str(damaged))
    code, err = errors(capsys, train_hf.main, *train_args(synthetic_dir, base, tmp_path / "export", *export))
    assert code == 2 and "Traceback" not in err and str(damaged / "trainer_state.json") in err


# ------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("name,value", [("batch_size", 0), ("batch_size", -1), ("max_new_tokens", 0)])
def test_segment_and_the_pipeline_refuse_counts_below_one(tiny_model, tiny_processor, name, value):
    from pipeline_gsva import GSVASegmentationPipeline

    pictures = [np.zeros((20, 30, 3), np.uint8)] * 2
    with pytest.raises(ValueError, match=rf"{name} must be an int of at least 1, got {value}"):
        tiny_model.segment(tiny_processor, pictures, targets=["a"], **{name: value})
    with pytest.raises(ValueError, match=rf"{name} must be an int of at least 1, got {value}"):
        tiny_model.segment(tiny_processor, pictures, text="what is it?", **{name: value})
    pipe = GSVASegmentationPipeline(model=tiny_model, processor=tiny_processor, device="cpu")
    with pytest.raises(ValueError, match=rf"{name} must be an int of at least 1, got {value}"):
        pipe(pictures, text="what is it?", **{name: value})
    if name == "batch_size":
        with pytest.raises(ValueError, match=rf"batch_size must be an int of at least 1, got {value}"):
            GSVASegmentationPipeline(model=tiny_model, processor=tiny_processor, device="cpu", batch_size=value)(
                pictures, targets=["a"]
            )
    assert len(tiny_model.segment(tiny_processor, pictures, targets=["a"], batch_size=1)) == 2


# ------------------------------------------------------------------------------------------ outputs
def test_segment_checks_out_before_loading_the_model(saved_tiny_folder, tmp_path, capsys, monkeypatch):
    loads = []
    real_load = command.load_gsva_pinned
    monkeypatch.setattr(command, "load_gsva_pinned", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    picture = image(tmp_path / "a.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "results", blocker / "deeper" / "results"):
        code, err = errors(capsys, command.main, picture, "the cat", "--model", saved_tiny_folder, "--out", out)
        assert code == 2 and f"--out {out}: {blocker} is a file, not a folder" in err
    assert loads == [] and blocker.read_text() == ""


class FullDisk:
    """A file whose writes fail for lack of space after half the first one went through."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_disk_for(monkeypatch, matches):
    """Writes to the files whose path `matches` (opened by path or by descriptor) fail as on a full disk."""
    real_open = io.open

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        return FullDisk(handle) if any(c in mode for c in "wax") and matches(str(path)) else handle

    monkeypatch.setattr(io, "open", opening)


def test_a_full_disk_costs_the_image_its_result_and_names_the_file(saved_tiny_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    image(folder / "a.png", 1)
    image(folder / "b.png", 2)
    out = tmp_path / "out"
    fill_disk_for(monkeypatch, lambda path: path.endswith(os.path.join("a.png", "overlay.png")))
    code, err = errors(capsys, command.main, folder, "the cat", "--model", saved_tiny_folder, "--out", out)
    assert code == 1 and f"{out / 'a.png' / 'overlay.png'}: No space left on device" in err
    summary = json.loads((out / "summary.json").read_text())
    status = {entry["image"]: entry for entry in summary["images"]}
    assert status[str(folder / "a.png")]["status"] == "failed" and status[str(folder / "b.png")]["status"] == "ok"
    assert "overlay.png: No space left on device" in status[str(folder / "a.png")]["problems"][0]
    assert not (out / "a.png" / "overlay.png").exists() and (out / "b.png" / "overlay.png").is_file()


def test_a_full_disk_for_the_summary_is_named_and_exits_1(saved_tiny_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fill_disk_for(monkeypatch, lambda path: "summary.json" in os.path.basename(path))
    code, err = errors(capsys, command.main, image(tmp_path / "a.png"), "the cat", "--model", saved_tiny_folder, "--out", out)
    assert code == 1 and f"{out / 'summary.json'}: No space left on device" in err and "Traceback" not in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_evaluation_json_names_it_and_keeps_the_earlier_file(tmp_path, monkeypatch):
    from gsva_hf.metrics import GresAccumulator

    path = tmp_path / "eval.json"
    path.write_text('{"earlier": true}')
    fill_disk_for(monkeypatch, lambda name: "eval.json" in os.path.basename(name))
    with pytest.raises(OSError) as info:
        GresAccumulator().write_json(path, val_dataset="grefcoco|unc|val")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"earlier": True} and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
