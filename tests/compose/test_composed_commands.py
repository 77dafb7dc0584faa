"""A composed folder through the commands as a user runs them: train_hf.py (LoRA, export), eval_hf.py in its three
modes, gsva-segment, gsva-push --dry-run; DeepSpeed ZeRO-2 in the full tier."""

import json
import os
import subprocess
import sys

import pytest

import eval_hf
import train_hf
from gsva_hf import hub, segment
from gsva_hf.compose import compose_gsva
from tests.conftest import REPO, free_port


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 24, "val": 4, "testA": 0, "testB": 0}, seed=5)
    return root


@pytest.fixture(scope="module")
def composed_folder(tmp_path_factory):
    from gsva_hf import tiny_parts

    root = tmp_path_factory.mktemp("composed")
    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", root / "vlm")
    sam = tiny_parts.save_tiny_mask_decoder("sam2", root / "sam2")
    compose_gsva(str(vlm), str(sam), root / "model")
    return root / "model"


def train_args(folder, task, output, *extra):
    return [
        "--model_name_or_path", str(folder), "--dataset_dir", str(task), "--dataset", "refer_seg", "--sample_rates", "1",
        "--refer_seg_data", "grefcoco", "--output_dir", str(output), "--use_cpu", "true", "--per_device_train_batch_size",
        "2", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3", "--save_strategy", "no", "--val_dataset", "",
        "--logging_steps", "1", "--torch_threads", "1", *extra,
    ]  # fmt: skip


def test_train_eval_segment_and_push_a_composed_folder(composed_folder, task, tmp_path, capsys):
    train_hf.main(train_args(composed_folder, task, tmp_path / "run", "--max_steps", "2"))
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["vlm_config"]["model_type"] == "qwen2_5_vl" and config["sam_config"]["model_type"] == "sam2"
    for mode in ("teacher_forced", "targets", "generate"):
        output = tmp_path / f"eval-{mode}.json"
        eval_hf.main([
            "--model", str(final), "--dataset_dir", str(task), "--val_dataset", "grefcoco|unc|val", "--mode", mode,
            "--max_new_tokens", "4", "--output", str(output),
        ])  # fmt: skip
        result = json.loads(output.read_text())
        assert result["mode"] == mode and len(result["images"]) == 4
        metrics = result["metrics"]
        assert metrics["count"] == metrics["tp"] + metrics["fn"] + metrics["fp"] + metrics["tn"] > 0
        assert 0.0 <= metrics["giou"] <= 1.0 and 0.0 <= metrics["n_acc"] <= 1.0
    segment.main([str(REPO / "gsva_hf" / "assets" / "example.png"), "the red circle; a dog", "--model", str(final), "--out", str(tmp_path / "seg")])
    summary = json.loads((tmp_path / "seg" / "result.json").read_text())
    assert [t["phrase"] for t in summary["targets"]] == ["the red circle", "a dog"]
    assert all(t["rle"]["size"] == [128, 128] for t in summary["targets"])
    hub.main([str(final), "you/gsva-qwen", "--dry-run", "--out", str(tmp_path / "push")])
    card = (tmp_path / "push" / "README.md").read_text()
    assert "qwen2_5_vl" in card and "sam2" in card


@pytest.mark.slow
def test_zero2_trains_a_composed_folder_like_the_plain_trainer(composed_folder, task, tmp_path):
    """DeepSpeed ZeRO-2 (one process, CPU) with the unchanged config gives the plain Trainer's losses."""
    pytest.importorskip("deepspeed")

    def losses(name, *extra):
        output = tmp_path / name
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
            str(REPO / "train_hf.py"), *train_args(composed_folder, task, output, "--max_steps", "3", "--lora_r", "8",
            "--save_strategy", "steps", "--save_steps", "3"), *extra,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        history = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    zero2 = losses("zero2", "--deepspeed", str(REPO / "configs" / "deepspeed_zero2.json"))
    plain = losses("plain")
    assert len(zero2) == len(plain) == 3
    assert zero2 == pytest.approx(plain, rel=1e-5)
