"""train_hf.py keeps other runs and a user's files safe: another run's checkpoint is never resumed into a folder
holding an earlier run, the export folder must be absent, empty or that run's own earlier export, records are
replaced instead of written through links, bad numbers and folders are one-line usage errors before the model
loads, a diverged run ends in one line, and configs whose sizes multiply to trillions of parameters are refused."""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_hf
from tests.conftest import REPO, TINY

SYNTHETIC_FLAGS = ["--dataset", "refer_seg", "--sample_rates", "1", "--refer_seg_data", "grefcoco"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 4, "val": 2, "testA": 0, "testB": 0}, seed=3)
    return root


@pytest.fixture()
def no_model(monkeypatch):
    """Where a usage error is expected, loading the model is a failure of the test."""

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(train_hf, "load_model", never)


def flags(data_dir, output_dir, *extra) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--dataset_dir", str(data_dir), *SYNTHETIC_FLAGS, "--max_steps", "2",
        "--val_dataset", "", "--use_cpu", "true", "--report_to", "none", *extra,
    ]  # fmt: skip


def usage_error(capsys, argv) -> str:
    """train_hf.main must end with exit 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        train_hf.main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(folder)): ("<link>" if p.is_symlink() else p.read_bytes() if p.is_file() else "<dir>")
        for p in sorted(folder.rglob("*"))
    }


def checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    return folder


def fake_export(folder: Path, *extra: str) -> Path:
    """A folder holding what an export writes (names and a GSVA config.json), plus `extra` files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gsva"}))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json", "modeling_gsva.py", *extra):  # fmt: skip
        (folder / name).write_text("x")
    return folder


def run_a(tmp_path: Path) -> Path:
    """An output folder holding an earlier run: a checkpoint, its record and its export."""
    run = tmp_path / "tr1"
    checkpoint(run / "checkpoint-2")
    (run / "train_args.json").write_text("{}")
    fake_export(run / "final")
    return run


def checked(argv):
    """The training arguments after `check_output_dir` accepted them."""
    _, _, training_args = train_hf.parse_arguments(argv)
    train_hf.check_output_dir(training_args)
    return training_args


# ------------------------------------------------------------------------------------------ output folder
def test_another_runs_checkpoint_is_never_resumed_into_a_folder_holding_a_run(capsys, data_dir, tmp_path, no_model):
    run = run_a(tmp_path)
    other = checkpoint(tmp_path / "tr2" / "checkpoint-1")
    before = tree(run)
    resume = ["--resume_from_checkpoint", str(other), "--save_total_limit", "1"]
    line = usage_error(capsys, flags(data_dir, run, *resume))
    assert f"--resume_from_checkpoint {other}" in line and f"--output_dir {run}" in line
    assert tree(run) == before
    # The same run resumes; another run's checkpoint resumes into a new or empty folder.
    checked(flags(data_dir, run, "--resume_from_checkpoint", str(run / "checkpoint-2")))
    checked(flags(data_dir, run, "--resume_from_checkpoint", "latest"))
    checked(flags(data_dir, tmp_path / "new", "--resume_from_checkpoint", str(other)))
    (tmp_path / "empty").mkdir()
    checked(flags(data_dir, tmp_path / "empty", "--resume_from_checkpoint", str(other)))


def test_an_evaluation_record_marks_an_earlier_run(capsys, data_dir, tmp_path, no_model):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_results.json").write_text("{}")
    assert "eval_results.json" in usage_error(capsys, flags(data_dir, run))


def test_export_only_needs_a_checkpoint_before_the_model_loads(capsys, data_dir, tmp_path, no_model):
    assert "--resume_from_checkpoint" in usage_error(capsys, flags(data_dir, tmp_path / "run", "--export_only", "true"))


# ------------------------------------------------------------------------------------------ export folder
def test_an_export_folder_holding_other_files_is_refused_before_the_model_loads(capsys, data_dir, tmp_path, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (mine / "model-00001-of-00002.safetensors").write_text("my weights")
    (mine / "notes.txt").write_text("mine")
    before = tree(mine)
    line = usage_error(capsys, flags(data_dir, tmp_path / "run", "--export_dir", str(mine)))
    assert f"{mine}" in line and "--export_dir" in line and "notes.txt" in line
    assert tree(mine) == before and not (tmp_path / "run").exists()
    # Only a GSVA config counts as an export's.
    (mine / "notes.txt").unlink()
    assert "not a GSVA config" in usage_error(capsys, flags(data_dir, tmp_path / "run", "--export_dir", str(mine)))
    # An export, but a fresh run is not the run that wrote it.
    earlier = fake_export(tmp_path / "earlier")
    assert str(earlier) in usage_error(capsys, flags(data_dir, tmp_path / "run", "--export_dir", str(earlier)))
    # A file, and a link, are not export folders.
    (tmp_path / "file").write_text("x")
    assert "is a file" in usage_error(capsys, flags(data_dir, tmp_path / "run", "--export_dir", str(tmp_path / "file")))
    (tmp_path / "empty_target").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "empty_target", target_is_directory=True)
    line = usage_error(capsys, flags(data_dir, tmp_path / "run", "--export_dir", str(tmp_path / "linked")))
    assert "symbolic link" in line


def test_the_earlier_export_of_the_same_run_is_replaced_only_when_it_holds_only_export_files(
    capsys, data_dir, tmp_path, no_model
):
    run = run_a(tmp_path)
    resume = ("--resume_from_checkpoint", str(run / "checkpoint-2"))
    checked(flags(data_dir, run, *resume))
    (run / "final" / "notes.txt").write_text("mine")
    line = usage_error(capsys, flags(data_dir, run, *resume))
    assert str(run / "final") in line and "notes.txt" in line
    (run / "final" / "notes.txt").unlink()
    (run / "final" / "tokenizer.json").unlink()
    (run / "final" / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    assert "tokenizer.json" in usage_error(capsys, flags(data_dir, run, *resume))
    # --export_only may replace the earlier export in the --export_dir it is given.
    earlier = fake_export(tmp_path / "earlier")
    export = ("--export_only", "true", "--export_dir", str(earlier))
    checked(flags(data_dir, tmp_path / "new", *export, "--resume_from_checkpoint", str(run / "checkpoint-2")))


# ------------------------------------------------------------------------------------------ links
def test_records_replace_a_link_instead_of_writing_through_it(tiny_model, tiny_processor, tmp_path, monkeypatch):
    import gsva_hf.data.mixed
    import gsva_hf.evaluation

    output = tmp_path / "run"
    output.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("train_args.json", "eval_results.json"):
        (elsewhere / name).write_text("theirs")
        (output / name).symlink_to(elsewhere / name)
    result = SimpleNamespace(log_line="ok", metrics={"giou": 0.5, "n_acc": float("nan")})
    monkeypatch.setattr(gsva_hf.evaluation, "evaluate_dataset", lambda *args, **kwargs: result)
    monkeypatch.setattr(gsva_hf.data.mixed, "build_val_dataset", lambda *args, **kwargs: [])
    accelerator = SimpleNamespace(
        wait_for_everyone=lambda: None, unwrap_model=lambda model: model, is_main_process=True
    )
    trainer = SimpleNamespace(is_world_process_zero=lambda: True, accelerator=accelerator, model=tiny_model)
    training_args = SimpleNamespace(output_dir=str(output), export_dir="", max_shard_size="5GB")
    data_args = SimpleNamespace(
        val_dataset="grefcoco|unc|val", dataset_dir="", eval_mode="teacher_forced", eval_batch_size=1
    )
    run = train_hf.TrainingRun(
        trainer, tiny_processor, None, data_args, training_args, recorded={"model": {"lora_r": 8}}
    )
    train_hf.finish_run(run)
    assert [p.read_text() for p in sorted(elsewhere.iterdir())] == ["theirs", "theirs"]
    assert not (output / "train_args.json").is_symlink() and not (output / "eval_results.json").is_symlink()
    assert json.loads((output / "train_args.json").read_text()) == {"model": {"lora_r": 8}}
    assert json.loads((output / "eval_results.json").read_text())["metrics"] == {"giou": 0.5, "n_acc": None}


# ------------------------------------------------------------------------------------------ usage errors
BAD_VALUES = [
    ("--learning_rate", "nan"),
    ("--learning_rate", "-0.0001"),
    ("--max_grad_norm", "nan"),
    ("--weight_decay", "inf"),
    ("--warmup_steps", "inf"),
    ("--adam_beta2", "1"),
    ("--ce_loss_weight", "nan"),
    ("--bce_loss_weight", "-2"),
    ("--dice_loss_weight", "inf"),
    ("--seg_rej_ce_weight", "nan"),
    ("--lora_dropout", "1"),
    ("--lora_alpha", "0"),
    ("--per_device_train_batch_size", "0"),
    ("--mask_head_learning_rate", "nan"),
]


@pytest.mark.parametrize("flag,value", BAD_VALUES)
def test_numbers_no_run_can_use_are_usage_errors(capsys, data_dir, tmp_path, no_model, flag, value):
    line = usage_error(capsys, flags(data_dir, tmp_path / "run", flag, value))
    assert line.startswith("train_hf.py: error: ") and flag in line and value in line


def test_a_run_with_no_steps_is_a_usage_error(capsys, data_dir, tmp_path, no_model):
    line = usage_error(capsys, [*flags(data_dir, tmp_path / "run"), "--max_steps", "0", "--num_train_epochs", "0"])
    assert "--max_steps" in line and "--num_train_epochs" in line


def test_an_output_folder_that_is_a_file_or_cannot_be_made_is_a_usage_error(capsys, data_dir, tmp_path, no_model):
    (tmp_path / "file").write_text("x")
    line = usage_error(capsys, flags(data_dir, tmp_path / "file"))
    assert f"--output_dir {tmp_path / 'file'}" in line and "is a file" in line
    assert "is a file" in usage_error(capsys, flags(data_dir, tmp_path / "file" / "run"))
    if sys.platform.startswith("linux"):
        line = usage_error(capsys, flags(data_dir, "/proc/gsva-test/run"))
        assert "--output_dir /proc/gsva-test/run" in line and "cannot create files in /proc" in line


def test_a_diverged_run_ends_in_one_line_and_exit_1(capsys, monkeypatch):
    from gsva_hf.loading import NonFiniteError

    def diverge(run):
        raise NonFiniteError("step 3/6: the ce loss is not finite (nan). Training stopped before this step's update")

    run = SimpleNamespace(training_args=SimpleNamespace(debug_errors=False))
    monkeypatch.setattr(train_hf, "build_run", lambda argv=None: run)
    monkeypatch.setattr(train_hf, "train_and_finish", diverge)
    with pytest.raises(SystemExit) as ended:
        train_hf.main([])
    err = capsys.readouterr().err
    assert ended.value.code == 1 and err.splitlines() == [
        "train_hf.py: error: step 3/6: the ce loss is not finite (nan). Training stopped before this step's update"
    ]
    run.training_args.debug_errors = True
    with pytest.raises(NonFiniteError):
        train_hf.main([])


# ------------------------------------------------------------------------------------------ config sizes
def huge_config(folder: Path) -> Path:
    """The tiny preset's config with an LLM whose every size is within the per-field limits: ~70 trillion parameters."""
    config = json.loads((TINY / "config.json").read_text())
    config["text_config"].update(
        hidden_size=65536,
        intermediate_size=262144,
        num_hidden_layers=1024,
        num_attention_heads=64,
        num_key_value_heads=64,
    )
    config["text_config"].pop("head_dim", None)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (folder / name).write_bytes((TINY / name).read_bytes())
    return folder


def test_a_config_building_trillions_of_parameters_is_refused_before_building(capsys, data_dir, tmp_path, monkeypatch):
    from configuration_gsva import GSVAConfig
    from gsva_hf.loading import read_config_file
    from modeling_gsva import GSVAForCausalLM

    def never(*args, **kwargs):
        raise AssertionError("the model was built from a config that should have been refused")

    monkeypatch.setattr(GSVAForCausalLM, "_from_config", never)
    folder = huge_config(tmp_path / "huge")
    line = usage_error(capsys, flags(data_dir, tmp_path / "run", "--model_name_or_path", str(folder)))
    assert str(folder / "config.json") in line and "text_config" in line
    assert re.search(r"about [\d,]+ billion parameters", line) and "at most 200 billion" in line
    with pytest.raises(ValueError, match="text_config would build about"):
        read_config_file(folder / "config.json")
    with pytest.raises(ValueError, match="text_config would build about"):
        GSVAConfig.from_pretrained(folder)


@pytest.mark.parametrize("preset", ["gsva-tiny", "gsva-7b", "gsva-13b"])
def test_real_model_sizes_stay_within_the_parameter_bound(preset):
    from configuration_gsva import MAX_SUB_MODEL_PARAMETERS, GSVAConfig, estimated_parameters

    config = GSVAConfig.from_pretrained(REPO / "configs" / preset)
    estimates = [estimated_parameters(getattr(config, name)) for name in ("vision_config", "text_config", "sam_config")]
    assert all(0 < estimate < MAX_SUB_MODEL_PARAMETERS / 10 for estimate in estimates), estimates


# ------------------------------------------------------------------------------------------ flags and JSON
def test_help_lists_activation_checkpointing_not_its_deprecated_alias(capsys):
    with pytest.raises(SystemExit):
        train_hf.parse_arguments(["--help"])
    text = capsys.readouterr().out
    assert re.search(r"^\s+--activation_checkpointing\s.*\(default:", text, re.M)
    assert "--gradient_checkpointing" not in text
    _, _, training_args = train_hf.parse_arguments(["--activation_checkpointing"])
    assert training_args.activation_checkpointing is True


def test_json_writes_of_the_examples_and_benchmarks_are_strict():
    """Each `json.dumps` written to a file passes allow_nan=False or goes through metrics.strict_json."""
    loose = []
    for path in [
        REPO / "examples" / "tiny_synthetic" / "train_tiny.py",
        *sorted((REPO / "benchmarks").glob("bench_*.py")),
    ]:
        text = path.read_text()
        for match in re.finditer(r"(write_text|\.write|json\.dump)\(\(?json\.dumps\(|json\.dump\(", text):
            call = text[match.start() : text.find("\n", match.end())]
            if "allow_nan=False" not in call:
                loose.append(f"{path.relative_to(REPO)}: {call.strip()}")
    assert not loose, loose
