"""Every command answers an ordinary mistake the same way: one line naming the argument or file, exit status 2, no
traceback (unless --debug); flags take either spelling; --help shows the defaults."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval_hf
import train_hf
from gsva_hf import convert_gsva_to_hf, hub, segment
from gsva_hf.cli import CommandParser
from tests.conftest import REPO

EXAMPLE = REPO / "gsva_hf" / "assets" / "example.png"
BUNDLED = REPO / "gsva_hf" / "assets" / "gsva-tiny-synthetic"
SYNTHETIC_FLAGS = ["--dataset", "refer_seg", "--sample_rates", "1", "--refer_seg_data", "grefcoco"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 6, "val": 3, "testA": 0, "testB": 0}, seed=3)
    return root


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A model folder that is not GSVA: a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def usage_error(capsys, main, argv) -> str:
    """Run a command's main in-process; it must end with exit 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        result = main(argv)
        raise SystemExit(result)
    err = capsys.readouterr().err
    assert ended.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_eval_hf_mistakes(capsys, data_dir, llama_folder, tmp_path):
    base = ["--dataset_dir", str(data_dir), "--no_progress", "--output", str(tmp_path / "e.json")]
    line = usage_error(capsys, eval_hf.main, ["--model", "/nonexistent/model", *base])
    assert line.startswith("eval_hf.py: error:") and "/nonexistent/model" in line
    line = usage_error(capsys, eval_hf.main, ["--model", str(BUNDLED), *base, "--val_dataset", "grefcoco|unc|tset"])
    assert "'tset'" in line and "val" in line
    line = usage_error(
        capsys,
        eval_hf.main,
        ["--model", str(BUNDLED), "--dataset_dir", str(tmp_path / "none"), "--output", str(tmp_path / "e.json")],
    )
    assert str(tmp_path / "none") in line
    line = usage_error(capsys, eval_hf.main, ["--model", str(llama_folder), *base])
    assert str(llama_folder) in line
    assert "--batch_size" in usage_error(capsys, eval_hf.main, ["--model", str(BUNDLED), *base, "--batch-size", "0"])
    assert "--max_new_tokens" in usage_error(
        capsys, eval_hf.main, ["--model", str(BUNDLED), *base, "--max-new-tokens", "0"]
    )
    assert not (tmp_path / "e.json").exists()


def test_eval_hf_debug_shows_the_traceback(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="/nonexistent/model"):
        eval_hf.main(
            [
                "--model",
                "/nonexistent/model",
                "--dataset_dir",
                str(data_dir),
                "--output",
                str(tmp_path / "e.json"),
                "--debug",
            ]
        )


def test_train_hf_mistakes_stop_before_the_model_loads(capsys, data_dir, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(train_hf, "load_model", never)
    out = ["--output_dir", str(tmp_path / "run"), "--max_steps", "2"]
    line = usage_error(capsys, train_hf.main, out)
    assert "--dataset_dir" in line and "python -m gsva_hf.data.synthetic" in line and "--dataset refer_seg" in line
    line = usage_error(capsys, train_hf.main, [*out, "--dataset_dir", str(data_dir)])  # GSVA's four sources
    assert "ade20k" in line.lower() and "--dataset" in line
    line = usage_error(
        capsys,
        train_hf.main,
        [*out, "--dataset_dir", str(data_dir), *SYNTHETIC_FLAGS, "--val_dataset", "grefcoco|unc|tset"],
    )
    assert "'tset'" in line and "--val_dataset" in line
    line = usage_error(capsys, train_hf.main, [*out, "--dataset_dir", str(tmp_path / "missing"), *SYNTHETIC_FLAGS])
    assert str(tmp_path / "missing") in line
    assert "--max_steps" in usage_error(capsys, train_hf.main, ["--max-steps", "many"])
    monkeypatch.undo()
    assert "--model_name_or_path" in usage_error(
        capsys,
        train_hf.main,
        [*out, "--dataset_dir", str(data_dir), *SYNTHETIC_FLAGS, "--model_name_or_path", str(tmp_path / "nomodel")],
    )
    assert not (tmp_path / "run").exists()


def test_train_hf_resumes_or_refuses_a_folder_holding_an_earlier_run(capsys, data_dir, tmp_path):
    from transformers.trainer import TRAINER_STATE_NAME

    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6's save was cut short
        (run / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (run / f"checkpoint-{step}" / TRAINER_STATE_NAME).write_text("{}")
    flags = ["--output_dir", str(run), "--dataset_dir", str(data_dir), *SYNTHETIC_FLAGS, "--max_steps", "2"]
    line = usage_error(capsys, train_hf.main, flags)
    assert str(run) in line and f"--resume_from_checkpoint {run / 'checkpoint-4'}" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    _, _, training_args = train_hf.parse_arguments([*flags, "--resume_from_checkpoint", "latest"])
    train_hf.check_output_dir(training_args)
    assert training_args.resume_from_checkpoint == str(run / "checkpoint-4")
    assert f"resuming from {run / 'checkpoint-4'}" in capsys.readouterr().out


def test_train_hf_help_lists_the_readme_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as ended:
        train_hf.parse_arguments(["--help"])
    assert ended.value.code == 0
    text = capsys.readouterr().out
    readme = (REPO / "README.md").read_text()
    used = {
        flag
        for flag in (
            "--max_steps",
            "--per_device_train_batch_size",
            "--bf16",
            "--activation_checkpointing",
            "--deepspeed",
        )
        if flag in readme
    }
    for flag in used | {"--dataset_dir", "--output_dir", "--resume_from_checkpoint"}:
        (line,) = [line for line in text.splitlines() if line.strip().startswith(flag + " ")]
        assert "(default:" in line, line


def test_push_convert_and_segment_mistakes(capsys, llama_folder, tmp_path):
    line = usage_error(
        capsys, hub.main, [str(tmp_path / "nomodel"), "you/model", "--dry-run", "--out", str(tmp_path / "out")]
    )
    assert line.startswith("gsva-push: error:") and str(tmp_path / "nomodel") in line
    line = usage_error(capsys, hub.main, [str(llama_folder), "you/model", "--dry-run", "--out", str(tmp_path / "out")])
    assert str(llama_folder) in line
    line = usage_error(
        capsys,
        convert_gsva_to_hf.main,
        ["--release", str(tmp_path / "x.bin"), "--llava", str(tmp_path / "llava"), "--output", str(tmp_path / "o")],
    )
    assert line.startswith("gsva-convert-to-hf: error:") and str(tmp_path / "llava") in line
    line = usage_error(capsys, segment.main, [str(tmp_path / "none.png"), "a; b", "--out", str(tmp_path / "seg")])
    assert str(tmp_path / "none.png") in line
    line = usage_error(
        capsys, segment.main, [str(EXAMPLE), "a; b", "--out", str(tmp_path / "seg"), "--max_new_tokens", "0"]
    )
    assert "--max-new-tokens" in line
    line = usage_error(
        capsys, segment.main, [str(EXAMPLE), "a", "--out", str(tmp_path / "seg"), "--model", str(llama_folder)]
    )
    assert str(llama_folder) in line


def test_demo_mistakes(capsys, tmp_path):
    pytest.importorskip("gradio")
    sys.path.insert(0, str(REPO / "demo"))
    try:
        import app
    finally:
        sys.path.remove(str(REPO / "demo"))
    line = usage_error(capsys, app.main, ["--model", str(tmp_path / "nomodel")])
    assert line.startswith("demo/app.py: error:") and str(tmp_path / "nomodel") in line
    assert "--port" in usage_error(capsys, app.main, ["--port", "0"])


def test_either_flag_spelling_is_accepted_and_help_shows_defaults(capsys):
    parser = CommandParser(prog="tool")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length")
    group = parser.add_argument_group("more")
    group.add_argument("--lora_r", type=int, default=8, help="rank")
    args = parser.parse_args(["--max_new_tokens", "5", "--lora-r", "2"])
    assert (args.max_new_tokens, args.lora_r, args.debug) == (5, 2, False)
    parser.print_help()
    text = capsys.readouterr().out
    assert "(default: 128)" in text and "(default: 8)" in text and "--max_new_tokens" not in text
    assert eval_hf.parse_args(["--model", "m", "--max-new-tokens", "7", "--trust-remote-code"]).max_new_tokens == 7
    assert (
        segment.build_parser().parse_args([str(EXAMPLE), "a", "--out", "o", "--max_new_tokens", "9"]).max_new_tokens
        == 9
    )


@pytest.mark.slow
def test_installed_commands_fail_in_one_line(tmp_path):
    """As a user runs them: the console scripts and the two scripts, in fresh processes."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [
        [str(bin_dir / "gsva-segment"), str(tmp_path / "none.png"), "a", "--out", str(tmp_path / "o")],
        [sys.executable, str(REPO / "eval_hf.py"), "--model", "/nonexistent/model", "--dataset_dir", str(tmp_path)],
        [sys.executable, str(REPO / "train_hf.py"), "--max_steps", "30"],
        [str(bin_dir / "gsva-push"), str(tmp_path / "nomodel"), "you/model", "--dry-run", "--out", str(tmp_path / "p")],
    ]
    for command in runs:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if "error:" in line or "Traceback" in line]
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, (command, done.stderr)


def test_eval_hf_replaces_only_its_own_earlier_output(capsys, data_dir, tmp_path):
    model = tmp_path / "model"
    import shutil

    shutil.copytree(BUNDLED, model)
    config = (model / "config.json").read_bytes()
    base = ["--model", str(model), "--dataset_dir", str(data_dir), "--no_progress"]
    line = usage_error(capsys, eval_hf.main, [*base, "--output", str(model / "config.json")])
    assert str(model / "config.json") in line and (model / "config.json").read_bytes() == config
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    assert str(link) in usage_error(capsys, eval_hf.main, [*base, "--output", str(link)])
    assert not (tmp_path / "elsewhere.json").exists()

    output = tmp_path / "eval.json"
    first = eval_hf.main([*base, "--output", str(output)])
    assert eval_hf.main([*base, "--output", str(output)]) == first  # its own earlier output is replaced
