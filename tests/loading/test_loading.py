"""`gsva_hf.loading.load_gsva`: incomplete checkpoints are refused by name, and a folder's code runs only when
trusted."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from gsva_hf.loading import IncompleteCheckpointError, load_gsva
from tests.conftest import REPO


@pytest.fixture()
def folder(saved_tiny_folder):
    return saved_tiny_folder


def rewrite_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_complete_folder_loads_with_the_saved_tensors(folder, tiny_model):
    model, processor = load_gsva(folder)
    assert type(model).__module__ == "modeling_gsva" and type(processor).__module__ == "processing_gsva"
    saved = tiny_model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_missing_unexpected_and_mismatched_tensors_are_refused(folder):
    key = "model.sam.mask_decoder.iou_token.weight"
    rewrite_weights(folder, lambda t: t.pop(key))
    with pytest.raises(IncompleteCheckpointError, match=rf"{folder}: .*missing \(would be drawn at random\): {key}"):
        load_gsva(folder)

    rewrite_weights(folder, lambda t: t.update({key: torch.zeros(1, 64), "extra.weight": torch.zeros(2)}))
    with pytest.raises(IncompleteCheckpointError, match=r"unexpected \(the model has no such tensor\): extra.weight"):
        load_gsva(folder)

    def wrong_shape(tensors):
        tensors.pop("extra.weight")
        width = tensors["model.text_hidden_fcs.0.0.bias"].shape[0]
        tensors["model.text_hidden_fcs.0.0.bias"] = torch.zeros(width + 1)

    rewrite_weights(folder, wrong_shape)
    with pytest.raises(IncompleteCheckpointError, match=r"shape mismatches: model.text_hidden_fcs.0.0.bias \(checkpoint \[\d+\], model \[\d+\]\)"):
        load_gsva(folder)


def test_bad_arguments_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gsva(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Hub repository id"):
        load_gsva(tmp_path / "nowhere" / "deeper")
    with pytest.raises(ValueError, match="revision 'main' applies to Hub repositories"):
        load_gsva(folder, revision="main")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_gsva(folder, dtype="fp8")


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gsva_hf.loading import load_gsva
    folder, marker = sys.argv[1], Path(sys.argv[2])
    model, _ = load_gsva(folder)
    print("default", type(model).__module__, marker.exists(), flush=True)
    model, _ = load_gsva(folder, trust_remote_code=True)
    print("trusted", type(model).__module__.split(".")[0], marker.exists(), flush=True)
    """
)


@pytest.mark.slow
def test_folder_code_runs_only_when_trusted(folder, tmp_path):
    marker = tmp_path / "folder-code-ran"
    with open(folder / "modeling_gsva.py", "a") as handle:
        handle.write(f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(marker)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["default modeling_gsva False", "trusted transformers_modules True"]
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert note.startswith(f"note: {folder} ships its own modeling_gsva.py;") and "using the installed" in note
    assert json.loads((folder / "config.json").read_text())["auto_map"]


def test_folder_with_the_installed_code_loads_without_a_note(folder, capsys):
    from gsva_hf.loading import load_gsva

    load_gsva(folder, "fp32", "cpu")
    assert "note:" not in capsys.readouterr().err
