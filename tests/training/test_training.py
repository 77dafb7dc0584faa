"""train_hf.py: what trains, export, short runs, resume, multi-process, DeepSpeed config."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

import train_hf
from gsva_hf.training import export_model, lora_target_regex, prepare_for_training, trainable_parameter_names
from tests.conftest import REPO, TINY, free_port


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 40, "val": 6, "testA": 0, "testB": 0}, seed=3)
    return root


def run_args(data_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(TINY), "--dataset_dir", str(data_dir), "--dataset", "refer_seg",
        "--sample_rates", "1", "--refer_seg_data", "grefcoco", "--output_dir", str(output_dir), "--use_cpu", "true",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7",
        "--save_strategy", "no", "--val_dataset", "", *extra,
    ]  # fmt: skip


def expected_lora_count(model, rank: int) -> int:
    """r*(in+out) per LLM q/v projection, counted on the plain model."""
    total = 0
    for name, module in model.named_modules():
        if name.startswith("model.language_model.") and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
            total += rank * (module.in_features + module.out_features)
    return total


def test_lora_recipe_trains_exactly_the_intended_parameters(tiny_model):
    llm_layers = tiny_model.config.text_config.num_hidden_layers
    full = {
        "lm_head": tiny_model.lm_head.weight.numel(),
        "embed_tokens": tiny_model.get_input_embeddings().weight.numel(),
        "mask_decoder": sum(p.numel() for p in tiny_model.sam.mask_decoder.parameters()),
        "text_hidden_fcs": sum(p.numel() for p in tiny_model.text_hidden_fcs.parameters()),
    }
    lora = expected_lora_count(tiny_model, 8)
    peft_model = prepare_for_training(tiny_model, lora_r=8)
    names = trainable_parameter_names(peft_model)
    lora_names = [n for n in names if "lora_" in n]
    assert len(lora_names) == 2 * 2 * llm_layers  # A and B for q_proj and v_proj of every layer
    assert all(".language_model." in n and (".q_proj." in n or ".v_proj." in n) for n in lora_names)
    others = [n for n in names if "lora_" not in n]
    assert all("modules_to_save" in n and any(k in n for k in full) for n in others)
    counted = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert counted == lora + sum(full.values())
    assert not any(k in n for n in names for k in ("vision_tower", "multi_modal_projector", "vision_encoder", "prompt_encoder"))


def test_lora_zero_and_full_llm_switches(tiny_config):
    from modeling_gsva import GSVAForCausalLM

    frozen_llm = prepare_for_training(GSVAForCausalLM(tiny_config), lora_r=0)
    names = trainable_parameter_names(frozen_llm)
    assert not any(".layers." in n and n.startswith("model.language_model") for n in names)
    assert "model.text_hidden_fcs.0.0.weight" in names and "lm_head.weight" in names
    full_llm = prepare_for_training(GSVAForCausalLM(tiny_config), lora_r=-1, train_sam_encoder=True)
    names = trainable_parameter_names(full_llm)
    assert "model.language_model.layers.0.mlp.up_proj.weight" in names and any(n.startswith("model.sam.vision_encoder.") for n in names)
    pattern = re.compile(lora_target_regex("q_proj, v_proj"))
    assert pattern.fullmatch("base_model.model.model.language_model.layers.0.self_attn.q_proj")
    assert pattern.fullmatch("model.vlm.model.text_model.layers.1.self_attn.v_proj")
    assert not pattern.fullmatch("model.vlm.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.language_model.layers.0.self_attn.k_proj")


def test_a_config_only_preset_is_drawn_on_the_asked_device():
    """train_hf.py draws random presets on the training device (a GPU there), not on the CPU first; the meta
    device shows it here without a GPU, and the default CPU draw is unchanged by the seed."""
    from types import SimpleNamespace

    def settings(device):
        return SimpleNamespace(bf16=False, fp16=False, deepspeed=None, device=device)

    model_args = train_hf.ModelArguments(model_name_or_path=str(TINY))
    model, _ = train_hf.load_model(model_args, settings("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    torch.manual_seed(0)
    first, _ = train_hf.load_model(model_args, settings("cpu"))
    torch.manual_seed(0)
    second, _ = train_hf.load_model(model_args, settings(torch.device("cpu")))
    assert {p.device.type for p in first.parameters()} == {"cpu"}
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_merged_export_equals_unmerged_model(tiny_model, tiny_processor, tmp_path):
    from modeling_gsva import GSVAForCausalLM
    from tests.model.test_model import two_image_batch

    peft_model = prepare_for_training(tiny_model, lora_r=4, lora_alpha=16, lora_dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    batch, gt = two_image_batch(tiny_processor)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**batch, gt_masks=gt)
    export_model(peft_model, tiny_processor, tmp_path / "merged", max_shard_size="200KB")
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1
    merged = GSVAForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        after = merged(**batch, gt_masks=gt)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(after.pred_masks, before.pred_masks):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_short_run_loss_falls_and_prints_one_progress_line_per_logging_step(synthetic_dir, tmp_path, capsys):
    args = run_args(
        synthetic_dir, tmp_path / "run", "--max_steps", "40", "--learning_rate", "1e-3", "--warmup_steps", "2",
        "--logging_steps", "1", "--lora_r", "-1", "--train_sam_encoder", "true", "--train_vision_tower", "true",
        "--seg_rej_ce_weight", "5",
    )  # fmt: skip
    run = train_hf.build_run(args)
    run.trainer.train()
    losses = [entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry]
    parts = [entry for entry in run.trainer.state.log_history if "ce_loss" in entry]
    assert len(losses) == 40 and {"ce_loss", "mask_bce_loss", "mask_dice_loss"} <= set(parts[0])
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{step}/40" for step in range(1, 41)]
    last = parts[-1]
    assert lines[-1].startswith(
        f"step 40/40  loss {losses[-1]:.4g} (ce {last['ce_loss']:.4g} bce {last['mask_bce_loss']:.4g} "
        f"dice {last['mask_dice_loss']:.4g})  lr "
    )
    assert " elapsed  ETA " in lines[0] and "ETA" not in lines[-1]


def test_progress_line_fields_and_eta():
    from gsva_hf.training import format_duration, progress_line

    assert [format_duration(s) for s in (0.4, 45, 723, 3720, 7261)] == ["0s", "45s", "12m03s", "1h02m", "2h01m"]
    line = progress_line(100, 6000, 723.0, 100, 1.23, {"ce_loss": 0.4, "mask_bce_loss": 0.5}, 3e-4)
    assert line == "step 100/6000  loss 1.23 (ce 0.4 bce 0.5)  lr 0.0003  12m03s elapsed  ETA 11h50m"
    resumed = progress_line(600, 1000, 60.0, 100, stage="vision")  # 100 steps ran here: 0.6 s each, 400 to go
    assert resumed == "vision step 600/1000  1m00s elapsed  ETA 4m00s"


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def final_weights(run):
    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resumed_run_ends_with_the_same_weights(synthetic_dir, tmp_path):
    common = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1", "--lora_r", "8")
    straight = train_hf.build_run(run_args(synthetic_dir, tmp_path / "straight", *common))
    straight.trainer.train()
    expected = final_weights(straight)

    interrupted = train_hf.build_run(run_args(synthetic_dir, tmp_path / "resumed", *common))
    interrupted.trainer.add_callback(StopAt(3))
    interrupted.trainer.train()
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    resumed = train_hf.build_run(run_args(synthetic_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    assert resumed.training_args.resume_from_checkpoint == str(tmp_path / "resumed" / "checkpoint-3")
    resumed.trainer.train(resume_from_checkpoint=resumed.training_args.resume_from_checkpoint)
    got = final_weights(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)

    # A save killed before its end (no trainer_state.json, the Trainer's last file) is refused, naming a good one.
    cut = tmp_path / "resumed" / "checkpoint-9"
    shutil.copytree(tmp_path / "resumed" / "checkpoint-3", cut)
    (cut / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-9: the checkpoint is incomplete .* latest complete one is .*checkpoint-6"):
        resumed.trainer.train(resume_from_checkpoint=str(cut))


@pytest.mark.slow
def test_two_process_cpu_run_completes_and_its_export_loads(synthetic_dir, tmp_path):
    """torchrun with gloo on CPU, then the exported folder loads with trust_remote_code (about a minute)."""
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO / "train_hf.py"), *run_args(synthetic_dir, output, "--max_steps", "2", "--lora_r", "8", "--torch_threads", "1"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output / "final", trust_remote_code=True)
    assert type(model).__name__ == "GSVAForCausalLM"
    assert json.loads((output / "train_args.json").read_text())["model"]["lora_r"] == 8


def test_deepspeed_zero2_config_is_accepted_by_the_trainer(tmp_path):
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(REPO / "configs" / "deepspeed_zero2.json"), report_to=[])
    assert args.deepspeed_plugin is not None or args.hf_deepspeed_config is not None


@pytest.mark.slow
def test_zero2_run_trains_like_the_plain_trainer(synthetic_dir, tmp_path):
    """The same seed and data through DeepSpeed ZeRO-2 (one process, CPU, fp32) and through the plain Trainer give
    the same per-step losses and the same exported weights: DeepSpeed changes where state lives, not the run."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    def train(name, *extra):
        output = tmp_path / name
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
            str(REPO / "train_hf.py"), *run_args(synthetic_dir, output, "--max_steps", "4", "--logging_steps", "1",
            "--warmup_steps", "1", "--lora_r", "8", "--torch_threads", "1", "--save_strategy", "steps", "--save_steps", "4"),
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        checkpoint = output / "checkpoint-4"
        history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        return checkpoint, losses, load_file(output / "final" / "model.safetensors")

    zero2_checkpoint, zero2_losses, zero2_weights = train("zero2", "--deepspeed", str(REPO / "configs" / "deepspeed_zero2.json"))
    plain_checkpoint, plain_losses, plain_weights = train("plain")
    assert (zero2_checkpoint / "global_step4").is_dir() and not (plain_checkpoint / "global_step4").exists()
    assert len(zero2_losses) == len(plain_losses) == 4
    assert zero2_losses == pytest.approx(plain_losses, rel=1e-5)
    assert zero2_weights.keys() == plain_weights.keys()
    for name in plain_weights:
        torch.testing.assert_close(zero2_weights[name], plain_weights[name], atol=1e-4, rtol=1e-4, msg=name)


def test_zero2_config_matches_gsva_settings():
    config = json.loads((REPO / "configs" / "deepspeed_zero2.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1e9
    assert zero["contiguous_gradients"] and zero["overlap_comm"] and zero["reduce_scatter"]


@pytest.mark.parametrize("lora_r", ["-1", "8"])
def test_mask_head_learning_rate_reaches_exactly_its_parameters(synthetic_dir, tmp_path, lora_r):
    args = run_args(
        synthetic_dir, tmp_path / "run", "--max_steps", "1", "--lora_r", lora_r, "--learning_rate", "3e-4",
        "--mask_head_learning_rate", "1e-4", "--weight_decay", "0.1",
    )  # fmt: skip
    check_learning_rate_groups(train_hf.build_run(args).trainer, {"mask_head": 1e-4, "rest": 3e-4})


def check_learning_rate_groups(trainer, rates: dict[str, float]):
    """Every trainable parameter sits in one optimizer group with its rate (`embeddings`, `mask_head` or `rest`) and
    the weight decay the Trainer gives it; the scheduler starts from exactly these rates."""
    from gsva_hf.training import is_mask_head

    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    optimizer = trainer.create_optimizer()
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable)
    embedding_rows = trainer.model.get_input_embeddings().weight
    for name, param in trainable:
        kind = "embeddings" if param is embedding_rows and "embeddings" in rates else "mask_head" if is_mask_head(name) else "rest"
        assert group_of[id(param)]["lr"] == rates[kind], name
        assert group_of[id(param)]["weight_decay"] == (trainer.args.weight_decay if name in decayed else 0.0), name
    trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    assert sorted(set(trainer.lr_scheduler.base_lrs)) == sorted(set(rates.values()))


@pytest.mark.parametrize(
    ("rates", "deepspeed", "message"),
    [
        ({"embedding_learning_rate": -1e-3}, None, "--embedding_learning_rate must be a finite number >= 0, got -0.001"),
        ({"mask_head_learning_rate": float("nan")}, None, "--mask_head_learning_rate must be a finite number >= 0, got nan"),
        ({"mask_head_learning_rate": 1e-3}, {"optimizer": {}}, "DeepSpeed config .* defines optimizer: remove it"),
        ({"mask_head_learning_rate": 1e-3}, {"scheduler": {}, "optimizer": {}}, "defines optimizer and scheduler"),
    ],
)
def test_own_learning_rates_that_could_not_apply_are_refused(tmp_path, rates, deepspeed, message):
    """Checked on plain settings objects: parsing a --deepspeed TrainingArguments needs deepspeed installed."""
    from types import SimpleNamespace

    if deepspeed is not None:
        (tmp_path / "ds.json").write_text(json.dumps({**deepspeed, "zero_optimization": {"stage": 2}}))
        deepspeed = str(tmp_path / "ds.json")
    settings = SimpleNamespace(deepspeed=deepspeed)
    with pytest.raises(ValueError, match=message):
        train_hf.check_own_learning_rates(settings, {"unused_learning_rate": None, **rates})
    settings.deepspeed = str(REPO / "configs" / "deepspeed_zero2.json")
    if all(rate >= 0 for rate in rates.values()):
        train_hf.check_own_learning_rates(settings, rates)  # the shipped config leaves both to the Trainer


RESEARCH_FLAGS = (
    "config_overrides", "embedding_init_std", "lm_init_std", "lm_init_modules", "make_synthetic_data",
    "synthetic_train_images", "synthetic_val_images", "synthetic_negative_kinds", "vision_pretrain_steps",
    "vision_pretrain_target", "vision_pretrain_learning_rate", "vision_pretrain_batch_size",
    "embedding_learning_rate", "eval_at_minutes",
)  # fmt: skip


def test_help_lists_every_project_flag_with_help_and_default_and_no_research_flag(capsys):
    from transformers import HfArgumentParser

    from gsva_hf.training_setup import COMMON_TRAINER_FLAGS, project_fields

    with pytest.raises(SystemExit) as exit_info:
        train_hf.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    project, trainer = printed.split("Trainer flags the README uses:")
    listed = {line.split()[0][2:]: line for line in project.splitlines() if line.startswith("  --")}
    for cls in train_hf.PROJECT_DATACLASSES:
        for field in project_fields(cls):
            line = listed.pop(field.name)
            assert field.metadata["help"] in line and f"(default: {field.default!r})" in line, line
    assert not listed, f"listed but not a project flag: {sorted(listed)}"
    trainer_flags = {line.split()[0][2:] for line in trainer.splitlines() if line.startswith("  --")}
    assert trainer_flags == set(COMMON_TRAINER_FLAGS) and trainer.count("(default: ") == len(COMMON_TRAINER_FLAGS)
    assert not [name for name in RESEARCH_FLAGS if name in printed]
    parser_flags = {action.dest for action in HfArgumentParser(train_hf.PROJECT_DATACLASSES)._actions}
    assert not parser_flags & set(RESEARCH_FLAGS)


def test_the_recipe_stays_short_and_the_package_never_imports_the_examples():
    import ast

    assert len((REPO / "train_hf.py").read_text().splitlines()) <= 350
    for path in [*(REPO / "gsva_hf").rglob("*.py"), *REPO.glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "examples"], f"{path} imports {names}"
