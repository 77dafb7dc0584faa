"""The commands' loading policy: a folder's own code runs only with --trust_remote_code, the processor loads
without notes, eval_hf takes the loading flags."""

import os
import subprocess
import sys

import pytest

from gsva_hf import segment as command
from tests.commands.test_segment import noise_image, run
from tests.conftest import REPO

PHRASES = "the red circle; the cat"


@pytest.fixture()
def model_dir(saved_tiny_folder):
    return saved_tiny_folder


def test_folder_code_runs_only_with_trust_remote_code(model_dir, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code_ran"
    with (model_dir / "modeling_gsva.py").open("a") as handle:
        handle.write(f"\n__import__('pathlib').Path({str(marker)!r}).write_text('ran')\n")
    image = noise_image(tmp_path / "a.png")
    code, err = run(capsys, image, "--targets", PHRASES, "--model", model_dir, "--out", tmp_path / "out")
    assert code == 0 and not marker.exists()
    assert "modeling_gsva.py" in err and "installed" in err and "--trust-remote-code" in err

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    command.load_gsva_pinned(model_dir, trust_remote_code=True)
    assert marker.read_text() == "ran"  # the flag does run the folder's code
    with pytest.raises(ValueError, match="--revision"):
        command.load_gsva_pinned("someone/gsva", trust_remote_code=True)


@pytest.mark.slow
def test_the_commands_load_the_processor_without_notes():
    """Whatever transformers says about its image-processor backends (versions differ), a command's processor load
    prints nothing a user would have to read."""
    script = "import sys; import gsva_hf.segment; from processing_gsva import GSVAProcessor; GSVAProcessor.from_pretrained(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", script, str(REPO / "configs" / "gsva-tiny")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_eval_takes_the_loading_flags_in_its_flag_style(tmp_path):
    import eval_hf

    base = ["--model", str(tmp_path), "--dataset_dir", str(tmp_path)]
    assert eval_hf.parse_args(base).trust_remote_code is False
    for spelling in ("--trust_remote_code", "--trust-remote-code"):
        args = eval_hf.parse_args(base + [spelling, "--revision", "abc123"])
        assert args.trust_remote_code is True and args.revision == "abc123"
