"""The base model and the head (llava's layout): `GSVAModel` gives the head's last hidden states, folders are
saved in the `model.*` + `lm_head.*` layout, the 0.1 layout still loads strictly, and a saved folder loads through
AutoModel (the base) and AutoModelForImageTextToText (the head) with its own code in a fresh process."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests._fresh_process import ISOLATE
from tests.conftest import REPO

FIXTURE_0_1 = REPO / "tests" / "fixtures" / "saved_by_0_1"


def tiny_batch(processor):
    images = [np.full((20, 30, 3), 90, np.uint8), np.full((17, 11, 3), 200, np.uint8)]
    return processor(images=images, text=["what is the red circle?", "and this?"], answers=["It is [SEG].", "a:[SEG], b:[REJ]."])


def header_keys(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


def test_base_forward_gives_the_heads_last_hidden_states(tiny_model, tiny_processor):
    from modeling_gsva import GSVAForConditionalGeneration, GSVAModel

    assert GSVAForConditionalGeneration is type(tiny_model) and isinstance(tiny_model.model, GSVAModel)
    assert tiny_model.language_model is tiny_model.model.language_model and tiny_model.sam is tiny_model.model.sam
    assert tiny_model.get_output_embeddings() is tiny_model.lm_head and tiny_model.get_decoder() is tiny_model.model.language_model
    batch = tiny_batch(tiny_processor)
    with torch.no_grad():
        head = tiny_model(**batch, output_hidden_states=True)
        base = tiny_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    assert torch.equal(tiny_model.lm_head(base.last_hidden_state), head.logits)
    assert torch.equal(base.last_hidden_state, head.hidden_states[-1])


def test_saved_folder_uses_the_new_layout_and_the_base_loads_from_it(saved_tiny_folder, tiny_model, tiny_processor):
    from modeling_gsva import GSVAModel

    keys = header_keys(saved_tiny_folder)
    assert "lm_head.weight" in keys and all(k.startswith("model.") or k == "lm_head.weight" for k in keys)
    base, info = GSVAModel.from_pretrained(saved_tiny_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    batch = tiny_batch(tiny_processor)
    with torch.no_grad():
        expected = tiny_model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).last_hidden_state
        got = base.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).last_hidden_state
    assert torch.equal(got, expected)


def test_a_0_1_folder_loads_strictly_and_is_saved_again_in_the_new_layout(tmp_path):
    from gsva_hf.loading import check_gsva_folder, check_loading_info
    from modeling_gsva import GSVAForCausalLM, current_key

    old_keys = header_keys(FIXTURE_0_1)
    assert any(k.startswith("language_model.model.") for k in old_keys)
    check_gsva_folder(FIXTURE_0_1)
    model, info = GSVAForCausalLM.from_pretrained(FIXTURE_0_1, output_loading_info=True)
    check_loading_info(str(FIXTURE_0_1), info)
    model.save_pretrained(tmp_path / "again")
    assert header_keys(tmp_path / "again") == {current_key(k) for k in old_keys}


LOADER = ISOLATE + textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModel, AutoModelForImageTextToText
    folder = sys.argv[1]
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    head = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(folder + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        states = base(**inputs).last_hidden_state
        logits = head(**inputs).logits
    torch.save({"base": type(base).__name__, "head": type(head).__name__, "states": states, "logits": logits}, folder + "/outputs.pt")
    """
)


@pytest.mark.slow
def test_saved_folder_loads_as_base_and_head_through_auto_classes_in_a_fresh_process(saved_tiny_folder, tiny_model, tiny_processor, tmp_path):
    batch = tiny_batch(tiny_processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        expected = tiny_model(**inputs)
        states = tiny_model.model(**inputs).last_hidden_state
    torch.save(inputs, saved_tiny_folder / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(saved_tiny_folder), str(REPO)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(saved_tiny_folder / "outputs.pt", weights_only=True)
    assert (got["base"], got["head"]) == ("GSVAModel", "GSVAForCausalLM")
    assert torch.equal(got["states"], states)
    assert torch.equal(got["logits"], expected.logits)
