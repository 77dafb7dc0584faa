"""Saved folders load with trust_remote_code in a process that cannot import the project; presets."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests._fresh_process import ISOLATE
from tests.conftest import REPO, card_snippet_lines

LOADER = ISOLATE + textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAModel"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "GSVAProcessor" and type(config).__name__ == "GSVAConfig"
    inputs = torch.load(folder + "/inputs.pt", weights_only=False)
    batch = processor(images=inputs["images"], text=inputs["text"], answers=inputs["answers"])
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        out = model(**batch)
    torch.save({"logits": out.logits, "masks": out.pred_masks}, folder + "/outputs.pt")
    """
)


@pytest.mark.slow
def test_saved_folder_loads_with_remote_code_in_a_fresh_process(tiny_model, tiny_processor, tmp_path):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    assert {"configuration_gsva.py", "modeling_gsva.py", "processing_gsva.py", "tokenizer.json"} <= set(os.listdir(folder))
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor"}

    images = [np.full((20, 30, 3), 90, np.uint8), np.full((17, 11, 3), 200, np.uint8)]
    text, answers = ["what is the red circle?", "and this?"], ["It is [SEG].", "Sure, a:[SEG], b:[REJ]."]
    batch = tiny_processor(images=images, text=text, answers=answers)
    with torch.no_grad():
        expected = tiny_model(**batch)
    torch.save({"images": images, "text": text, "answers": answers, "input_ids": batch["input_ids"]}, folder / "inputs.pt")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(REPO)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(folder / "outputs.pt", weights_only=True)
    assert torch.equal(got["logits"], expected.logits)
    for a, b in zip(got["masks"], expected.pred_masks):
        assert torch.equal(a, b), (a - b).abs().max()


def test_large_presets_have_the_original_shapes_and_ids():
    from configuration_gsva import GSVAConfig
    from modeling_gsva import GSVAForCausalLM

    expected = {
        "gsva-7b": (4096, 32, 32005, 32003, 32004, 1e-6),
        "gsva-13b": (5120, 40, 32005, 32000, 32001, 1e-6),
        "gsva-13b-llama2": (5120, 40, 32005, 32000, 32001, 1e-5),
    }
    for name, (width, layers, vocab, seg, rej, eps) in expected.items():
        config = GSVAConfig.from_pretrained(REPO / "configs" / name)
        text = config.text_config
        assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.rms_norm_eps) == (width, layers, vocab, eps)
        assert (config.seg_token_id, config.rej_token_id, config.num_image_tokens, config.out_dim) == (seg, rej, 256, 256)
        assert config.projector_type == "linear" and config.vision_feature_layer == -2
        sam = config.sam_config.vision_config
        assert (sam.hidden_size, sam.num_hidden_layers, list(sam.global_attn_indexes)) == (1280, 32, [7, 15, 23, 31])
    with torch.device("meta"):
        model = GSVAForCausalLM(GSVAConfig.from_pretrained(REPO / "configs" / "gsva-7b"))
    counts = {}
    for name, parameter in model.named_parameters():
        # The language model with its head, as 0.1's `language_model` held both; else the base's part.
        part = "language_model" if name.startswith(("model.language_model.", "lm_head.")) else name.split(".")[1]
        counts[part] = counts.get(part, 0) + parameter.numel()
    # LLaMA-7B with 32005 rows, CLIP ViT-L/14 vision (~303M), SAM ViT-H (~641M), text_hidden_fcs 4096^2+4096*256.
    assert counts["language_model"] == 6_738_415_616 + 5 * 2 * 4096
    assert 3.0e8 < counts["vision_tower"] < 3.05e8
    assert 6.3e8 < counts["sam"] < 6.45e8
    assert counts["text_hidden_fcs"] == 4096 * 4096 + 4096 + 4096 * 256 + 256
    assert counts["multi_modal_projector"] == 1024 * 4096 + 4096


BUNDLED_LOADER = ISOLATE + textwrap.dedent(
    """
    import runpy
    from transformers import AutoConfig, AutoModel, AutoProcessor
    folder = sys.argv[1]
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAConfig"
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAModel"
    assert type(AutoProcessor.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAProcessor"
    print("=== snippet ===", flush=True)
    runpy.run_path(sys.argv[3], run_name="__main__")
    """
)


def test_bundled_model_is_a_remote_code_folder_in_sync_with_the_code():
    from gsva_hf import hub

    stale = hub.bundled_out_of_date()
    assert not stale, (
        f"{hub.BUNDLED_MODEL}: {', '.join(stale)} differ from the repository's top-level files; refresh the bundled "
        "folder with `python -m gsva_hf.hub refresh-bundled` (rewrites code, config and processor files, not weights)"
    )
    config = json.loads((hub.BUNDLED_MODEL / "config.json").read_text())
    assert set(config["auto_map"]) == set(hub.AUTO_CLASSES)
    assert not (hub.BUNDLED_MODEL / hub.PUSH_MARKER).exists()


@pytest.mark.slow
def test_bundled_model_loads_as_its_card_says_in_a_fresh_process(tmp_path):
    """The card's lines, run as written from the clone's root by a process that cannot import the project."""
    import re

    from gsva_hf import hub

    card = (hub.BUNDLED_MODEL / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert f"model_id = {json.dumps(hub.BUNDLED_MODEL_ID)}" in snippet
    (tmp_path / "snippet.py").write_text(snippet)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", BUNDLED_LOADER, hub.BUNDLED_MODEL_ID, str(REPO), str(tmp_path / "snippet.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.split("=== snippet ===\n")[1]

    assert printed == card_snippet_lines(hub.BUNDLED_MODEL, hub.SYNTHETIC_TARGETS)


def test_refresh_bundled_rewrites_code_and_keeps_the_weights(tmp_path):
    import shutil

    from gsva_hf import hub

    copy = tmp_path / "bundled"
    shutil.copytree(hub.BUNDLED_MODEL, copy)
    weights = (copy / "model.safetensors").read_bytes()
    (copy / "modeling_gsva.py").write_text("# an older copy\n")
    (copy / "processing_gsva.py").unlink()
    assert hub.bundled_out_of_date(copy) == ["modeling_gsva.py", "processing_gsva.py"]
    assert hub.main(["refresh-bundled", str(copy)]) == 0
    assert hub.bundled_out_of_date(copy) == []
    assert (copy / "model.safetensors").read_bytes() == weights
    # transformers_version records the installed transformers by design; everything else is the bundled config.
    written, bundled = (json.loads((folder / "config.json").read_text()) for folder in (copy, hub.BUNDLED_MODEL))
    assert without_version(written) == without_version(bundled)


def without_version(config):
    """A config dict without the `transformers_version` entries (top level and sub-configs)."""
    if isinstance(config, dict):
        return {key: without_version(value) for key, value in config.items() if key != "transformers_version"}
    return config
