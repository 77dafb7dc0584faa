"""eval_hf.py end to end on the synthetic task: teacher-forced and generated, 1 vs 2 processes, log line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, free_port


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_processor, tiny_config):
    """A small synthetic val split and a tiny model folder (random weights, fixed seed)."""
    from gsva_hf.data.synthetic import write_synthetic_grefcoco
    from modeling_gsva import GSVAForCausalLM

    root = tmp_path_factory.mktemp("eval")
    write_synthetic_grefcoco(root / "data", num_images={"train": 0, "val": 5, "testA": 0, "testB": 0}, seed=5)
    torch.manual_seed(0)
    model = GSVAForCausalLM(tiny_config).eval()
    model.save_pretrained(root / "model")
    tiny_processor.save_pretrained(root / "model")
    return root


def run_eval_in_processes(root, output, processes: int, *extra):
    """`eval_hf.py` under torchrun with `processes` CPU processes (gloo)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
        str(REPO / "eval_hf.py"),
        "--model", str(root / "model"), "--dataset_dir", str(root / "data"), "--val_dataset", "grefcoco|unc|val",
        "--output", str(output), "--batch_size", "2", "--no_progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads(output.read_text())


def run_eval_here(root, output, capsys, *extra):
    """`eval_hf.main` in this process (the one-process CLI path without a subprocess's start-up)."""
    import eval_hf

    eval_hf.main([
        "--model", str(root / "model"), "--dataset_dir", str(root / "data"), "--val_dataset", "grefcoco|unc|val",
        "--output", str(output), "--batch_size", "2", "--no_progress", *extra,
    ])  # fmt: skip
    return capsys.readouterr().out, json.loads(output.read_text())


def test_teacher_forced_eval_matches_an_independent_computation(eval_setup, tiny_processor, capsys):
    """The CLI's numbers equal a hand-rolled loop over the same model with GSVA's formulas."""
    from gsva_hf.data.refer_seg import ReferSegValDataset
    from gsva_hf.teacher_forced import score_teacher_forced
    from modeling_gsva import GSVAForCausalLM

    stdout, report = run_eval_here(eval_setup, eval_setup / "one.json", capsys)
    assert re.search(r"grefcoco giou: \d\.\d{4}, ciou: \d\.\d{4}, N_acc: (\d\.\d{4}|nan), T_acc: (\d\.\d{4}|nan)\.", stdout)

    model = GSVAForCausalLM.from_pretrained(eval_setup / "model").eval()
    dataset = ReferSegValDataset(eval_setup / "data", "grefcoco|unc|val")
    ious, inter, union, tp, fn, fp, tn = [], 0, 0, 0, 0, 0, 0
    for index in range(len(dataset)):
        sample = dataset[index]
        batch = tiny_processor(images=[sample.image], conversations=[sample.rounds])
        out = score_teacher_forced(model, **{k: v for k, v in batch.items() if k != "labels"})
        for slot in range(sample.masks.shape[0]):
            pred = (out.pred_masks[0][slot] >= 0).numpy()
            gt = sample.masks[slot]
            rejected = bool(out.rejected[0][slot])
            i, u = int((pred & gt).sum()), int((pred | gt).sum())
            if not gt.any():
                tp, fn = tp + rejected, fn + (not rejected)
                ious.append(1.0 if rejected else 0.0)
                union += 0 if rejected else int(pred.sum())
            else:
                fp, tn = fp + rejected, tn + (not rejected)
                ious.append(i / (u + 1e-8))
                inter, union = inter + i, union + u
    metrics = report["metrics"]
    assert metrics["giou"] == pytest.approx(sum(ious) / (len(ious) + 1e-5), abs=1e-12)
    assert metrics["ciou"] == pytest.approx(inter / (union + 1e-10), abs=1e-12)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (tp, fn, fp, tn)
    assert len(report["images"]) == len(dataset) and report["processes"] == 1


@pytest.mark.slow
def test_two_processes_give_exactly_the_numbers_of_one(eval_setup, capsys):
    _, one = run_eval_here(eval_setup, eval_setup / "single.json", capsys)
    _, two = run_eval_in_processes(eval_setup, eval_setup / "double.json", 2)
    assert two["processes"] == 2
    assert two["metrics"] == one["metrics"]
    assert [r["index"] for r in two["images"]] == list(range(len(one["images"])))
    assert two["samples"] == one["samples"]


def test_generate_mode_scores_the_models_own_answers(eval_setup, capsys):
    stdout, report = run_eval_here(eval_setup, eval_setup / "gen.json", capsys, "--mode", "generate", "--max_new_tokens", "6")
    assert report["mode"] == "generate" and "grefcoco giou" in stdout
    assert all("answer" in record for record in report["images"])
    slots = sum(len(r["targets"]) for r in report["images"])
    assert report["metrics"]["count"] == slots
    # A random model rarely emits [SEG]/[REJ] in 6 tokens: targets without a slot count as rejected.
    assert all(len(r["pred_rejected"]) == len(r["targets"]) for r in report["images"])


def test_rela_protocol_and_refcoco_style_datasets(eval_setup, capsys):
    _, report = run_eval_here(eval_setup, eval_setup / "rela.json", capsys, "--protocol", "rela")
    assert report["config"]["protocol"] == "rela" and report["config"]["eval_size"] == [480, 480]
    assert set(report["metrics"]) >= {"giou", "ciou", "n_acc", "t_acc", "pr@0.7"}
    assert np.isfinite(report["metrics"]["giou"])


def test_eval_hf_reproduces_the_numbers_training_records(tmp_path):
    """train_hf evaluates its export after training; eval_hf on that folder gives exactly the same metrics."""
    import train_hf
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    data = tmp_path / "data"
    write_synthetic_grefcoco(data, num_images={"train": 12, "val": 4, "testA": 0, "testB": 0}, seed=9)
    output = tmp_path / "run"
    run = train_hf.build_run([
        "--model_name_or_path", str(REPO / "configs" / "gsva-tiny"), "--dataset_dir", str(data), "--dataset", "refer_seg",
        "--sample_rates", "1", "--refer_seg_data", "grefcoco", "--output_dir", str(output), "--use_cpu", "true",
        "--per_device_train_batch_size", "2", "--max_steps", "3", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--lora_r", "8", "--val_dataset", "grefcoco|unc|val", "--eval_batch_size", "2",
    ])  # fmt: skip
    run.trainer.train()
    recorded = train_hf.finish_run(run)
    assert json.loads((output / "eval_results.json").read_text())["metrics"] == recorded
    report_path = tmp_path / "eval.json"
    command = [
        sys.executable, str(REPO / "eval_hf.py"), "--model", str(output / "final"), "--dataset_dir", str(data),
        "--val_dataset", "grefcoco|unc|val", "--output", str(report_path), "--batch_size", "3", "--no_progress",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(report_path.read_text())["metrics"] == recorded


def test_targets_mode_scores_one_decision_per_expression_through_segment(eval_setup, tiny_processor):
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset
    from gsva_hf.metrics import GresAccumulator
    from modeling_gsva import GSVAForCausalLM

    model = GSVAForCausalLM.from_pretrained(eval_setup / "model").eval()
    dataset = build_val_dataset(eval_setup / "data", "grefcoco|unc|val")
    result = evaluate_dataset(model, tiny_processor, dataset, mode="targets", batch_size=2, progress=False)
    expected = GresAccumulator()
    for index in range(len(dataset)):
        sample = dataset[index]
        (segmented,) = model.segment(tiny_processor, [sample.image], targets=[list(sample.targets)])
        assert [t.phrase for t in segmented.targets] == list(sample.targets)
        assert result.records[index]["pred_rejected"] == [t.rejected for t in segmented.targets]
        for slot, target in enumerate(segmented.targets):
            expected.add(target.mask, sample.masks[slot].astype(np.uint8), target.rejected, f"{index}:{slot}")
    assert result.metrics == pytest.approx(expected.compute(), abs=1e-6)
