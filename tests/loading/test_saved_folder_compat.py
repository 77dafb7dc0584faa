"""A folder saved by an earlier release (tests/fixtures/saved_by_0_1) loads with today's classes, strictly, and gives
what the code that saved it computed; through its own remote code it still loads and segments."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import REPO

FOLDER = REPO / "tests" / "fixtures" / "saved_by_0_1"
TARGETS = ["the red circle", "the blue square", "the green star"]
EXAMPLE = REPO / "gsva_hf" / "assets" / "example.png"


def test_an_earlier_release_folder_gives_its_outputs_with_todays_classes():
    from gsva_hf.loading import load_gsva

    expected = load_file(FOLDER / "expected_outputs.safetensors")
    model, processor = load_gsva(FOLDER)  # strict: every tensor as saved, finite
    image = Image.open(EXAMPLE).convert("RGB")
    with torch.no_grad():
        inputs = processor(images=image, targets=TARGETS)
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
        decided = model.decide_targets(**inputs)
        (result,) = processor.post_process_instance_segmentation(
            decided, target_sizes=inputs["original_sizes"], targets=[TARGETS]
        )
        batch = processor(images=image, text="Please segment the red circle in this image.", answers="Sure, [SEG].")
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert [t.rejected for t in result.targets] == expected["rejected"].tolist()
    torch.testing.assert_close(torch.tensor([t.score for t in result.targets]), expected["scores"], atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.stack([t.mask for t in result.targets]).to(torch.uint8), expected["masks"])
    torch.testing.assert_close(logits[0, -8:], expected["forward_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_an_earlier_release_folder_loads_through_its_own_code(tmp_path):
    """Its own modeling_gsva.py & co. through the Auto classes, in a process that cannot import the project."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoProcessor

        folder, image = sys.argv[1], Image.open(sys.argv[2]).convert("RGB")
        targets = ["the red circle", "the blue square", "the green star"]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        result = model.segment(processor, image, targets=targets)[0]
        expected = load_file(folder + "/expected_outputs.safetensors")
        assert [t.rejected for t in result.targets] == expected["rejected"].tolist()
        assert torch.equal(torch.stack([t.mask for t in result.targets]).to(torch.uint8), expected["masks"])
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", script, str(FOLDER), str(EXAMPLE)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
