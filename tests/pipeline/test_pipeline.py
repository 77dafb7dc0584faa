"""The pipeline and the post-processor: a saved folder runs as a transformers pipeline in a fresh process, cut
answers are warned about, RLEs round-trip."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from processing_gsva import mask_to_rle
from tests.conftest import REPO
from tests.model.test_generate_and_targets import images_of

PIPELINE = textwrap.dedent(
    """
    import importlib.util, json, sys
    repo = sys.argv[2]
    sys.path = [p for p in sys.path if p not in ("", ".", repo)]
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    for name in ("modeling_gsva", "configuration_gsva", "processing_gsva", "pipeline_gsva", "gsva_hf"):
        assert importlib.util.find_spec(name) is None, name + " is importable"
    import numpy as np, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForImageTextToText, pipeline
    assert type(AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)).__name__ == "GSVAForCausalLM"
    pipe = pipeline(model=sys.argv[1], trust_remote_code=True)
    image = np.asarray(np.load(sys.argv[1] + "/image.npy"))
    one = pipe(image, targets=["the red circle", "a dog", "the sky"])
    two = pipe([image, image], text="What is the red circle in this image?", max_new_tokens=6)
    out = {
        "task": pipe.task,
        "one": [[d["label"], d["rejected"], d["score"], d["mask"].mode, d["mask"].size, int(np.asarray(d["mask"]).sum() // 255)] for d in one],
        "two": [len(r) for r in two],
    }
    print(json.dumps(out))
    """
)


def test_post_processor_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    mask = torch.from_numpy(np.random.default_rng(0).random((13, 17)) > 0.6)
    mask[0, 0] = True
    rle = mask_to_rle(mask)
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *rle["size"]))
    assert np.array_equal(decoded.astype(bool), mask.numpy())
    empty = mask_to_rle(torch.zeros(4, 5, dtype=torch.bool))
    assert empty == {"size": [4, 5], "counts": [20]}


@pytest.mark.slow
def test_pipeline_from_a_saved_folder_in_a_fresh_process(tiny_model, tiny_processor, tmp_path):
    import json

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    image = images_of((20, 30))[0]
    np.save(folder / "image.npy", image)
    expected = tiny_model.segment(tiny_processor, image, targets=["the red circle", "a dog", "the sky"])[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE, str(folder), str(REPO)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["task"] == "gsva-segmentation" and out["two"] == [len(r.targets) for r in tiny_model.segment(tiny_processor, [image, image], text="What is the red circle in this image?", max_new_tokens=6)]
    for (label, rejected, score, mode, size, area), target in zip(out["one"], expected.targets, strict=True):
        assert (label, rejected, mode, size) == (target.phrase, target.rejected, "L", [30, 20])
        assert score == pytest.approx(target.score, abs=1e-5) and area == int(target.mask.sum())


def test_pipeline_warns_when_an_answer_is_cut(tiny_model, tiny_processor):
    from pipeline_gsva import GSVASegmentationPipeline

    pipe = GSVASegmentationPipeline(model=tiny_model, processor=tiny_processor, device="cpu")
    with pytest.warns(UserWarning, match="cut at max_new_tokens"):
        pipe(images_of((20, 30))[0], text="what is the red circle?", max_new_tokens=2)
    assert [d["label"] for d in pipe(images_of((20, 30))[0], targets=["a", "b"])] == ["a", "b"]
