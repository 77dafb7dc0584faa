"""Composed GSVA on every tiny VLM family x SAM-family decoder: training forward and backward, generate with masks,
target mode (one slot per phrase, the same decisions as teacher forcing, batched as one by one), a LoRA step on the
language model only, the saved folder through remote code in a fresh process, and the refusals of what cannot be
composed."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers.utils import is_timm_available

from gsva_hf.compose import compose_gsva
from gsva_hf.teacher_forced import score_teacher_forced
from gsva_hf.training import prepare_for_training
from modeling_gsva import GSVAForCausalLM
from processing_gsva import eval_answer, target_phrase
from tests._fresh_process import ISOLATE
from tests.compose.conftest import PAIRS, QUESTIONS, TARGETS
from tests.conftest import REPO

ANSWERS = ["It is [SEG].", "Sure, the dog [SEG] and the bird [REJ]."]


def training_batch(processor, images):
    """Two rows with `[SEG]` and `[REJ]` answers and one ground-truth mask per slot at each image's size (the left
    half for `[SEG]`, learnable in a few steps; empty for `[REJ]`)."""
    batch = processor(images=images, text=QUESTIONS, answers=ANSWERS)
    gt_masks = []
    for image, answer in zip(images, ANSWERS):
        slots = re.findall(r"\[(SEG|REJ)\]", answer)
        masks = torch.zeros(len(slots), image.height, image.width)
        masks[[slot == "SEG" for slot in slots], :, : image.width // 2] = 1
        gt_masks.append(masks)
    return batch, gt_masks


def without(inputs, *names):
    return {key: value for key, value in inputs.items() if key not in names}


def assert_close_to_scale(actual, expected, tolerance, scale):
    """`actual` within `tolerance * scale`: a tiny random SAM's mask logits are ~1e-4, where a fixed absolute
    tolerance would pass any mask, so the tolerance is relative to the largest logit of the batch (`scale`)."""
    assert scale > 0, "the batch's masks are all zero"
    torch.testing.assert_close(actual, expected, atol=tolerance * scale, rtol=0)


def slot_positions(ids, config):
    return torch.nonzero(torch.isin(ids, torch.tensor([config.seg_token_id, config.rej_token_id]))).flatten()


def test_training_forward_and_backward_reach_the_head_and_the_mask_decoder(composed_pair, pair_images):
    model, processor = composed_pair.model, composed_pair.processor
    batch, gt_masks = training_batch(processor, pair_images)
    labels = batch["labels"][batch["labels"] != -100]
    assert {model.config.seg_token_id, model.config.rej_token_id} <= set(labels.tolist())
    model.train()
    try:
        out = model(**batch, gt_masks=gt_masks)
        for name in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss"):
            assert torch.isfinite(out[name]), name
        assert out.mask_bce_loss > 0 and out.mask_dice_loss > 0
        out.loss.backward()
        for part in (model.text_hidden_fcs, model.sam.mask_decoder):
            grads = [p.grad for p in part.parameters() if p.grad is not None]
            assert grads and any(bool(g.abs().sum() > 0) for g in grads), type(part).__name__
            assert all(bool(torch.isfinite(g).all()) for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_generate_returns_masks_at_each_images_size(composed_pair, pair_images):
    model, processor = composed_pair.model, composed_pair.processor
    inputs = processor(images=pair_images, text=QUESTIONS)
    out = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, do_sample=False)
    assert out.pred_masks.shape[:2] == out.slot_mask.shape and out.slot_mask.shape[0] == 2
    assert bool(out.slot_is_seg.any()), "the sharpened model generates a [SEG]"
    results = processor.post_process_instance_segmentation(out, target_sizes=inputs["original_sizes"])
    assert len(results) == 2
    for result, image, count in zip(results, pair_images, out.slot_mask.sum(1).tolist()):
        assert len(result.targets) == count
        for target in result.targets:
            assert target.mask.shape == (image.height, image.width) and target.mask.dtype == torch.bool


def test_target_mode_decides_one_slot_per_phrase_as_teacher_forcing_does(composed_pair, pair_images):
    model, processor = composed_pair.model, composed_pair.processor
    config = model.config
    inputs = processor(images=pair_images, targets=TARGETS)
    decided = model.decide_targets(**inputs)
    assert decided.slot_mask.sum(1).tolist() == [len(p) for p in TARGETS]
    assert len(set(decided.slot_is_seg[decided.slot_mask].tolist())) == 2, "both decisions occur"
    masks = processor.post_process_masks(decided.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    checked = 0
    for row, phrases in enumerate(TARGETS):
        flags = decided.slot_is_seg[row, : len(phrases)]
        question, _ = processor.targets_conversation(phrases)
        answer = eval_answer([target_phrase(p) for p in phrases], (~flags).tolist())
        gt = processor(images=pair_images[row : row + 1], conversations=[[(question, answer)]])
        ids = gt["input_ids"][0][gt["attention_mask"][0].bool()]
        assert torch.equal(ids, decided.sequences[row])
        scored = score_teacher_forced(model, **without(gt, "labels"), reeval=False)
        with torch.no_grad():
            logits = model(**without(gt, "labels", "sam_pixel_values")).logits[0]
        before = slot_positions(gt["input_ids"][0], config) - 1
        torch.testing.assert_close(
            decided.slot_scores[row, : len(phrases)], model.slot_scores(logits[before], flags), atol=1e-4, rtol=1e-4
        )
        scale = float(decided.pred_masks.abs().max())
        assert_close_to_scale(scored.pred_masks[0][flags], masks[row][: len(phrases)][flags], 1e-4, scale)
        for slot, top in enumerate(logits[before].argmax(-1).tolist()):
            if top in (config.seg_token_id, config.rej_token_id):
                checked += 1
                assert bool(scored.rejected[0][slot]) == (not bool(flags[slot])), (row, slot)
    assert checked >= 3, "the sharpened slot tokens should be the full-vocabulary argmax at most slots"


def test_target_mode_batched_equals_one_by_one(composed_pair, pair_images):
    model, processor = composed_pair.model, composed_pair.processor
    together = model.decide_targets(**processor(images=pair_images, targets=TARGETS))
    for row, phrases in enumerate(TARGETS):
        alone = model.decide_targets(**processor(images=pair_images[row : row + 1], targets=[phrases]))
        count = len(phrases)
        assert torch.equal(alone.sequences[0], together.sequences[row])
        assert torch.equal(alone.slot_is_seg[0, :count], together.slot_is_seg[row, :count])
        torch.testing.assert_close(
            alone.slot_scores[0, :count], together.slot_scores[row, :count], atol=1e-5, rtol=1e-5
        )
        scale = float(together.pred_masks.abs().max())
        assert_close_to_scale(alone.pred_masks[0, :count], together.pred_masks[row, :count], 1e-5, scale)


def module_name(root, module) -> str:
    return next(name for name, candidate in root.named_modules() if candidate is module)


def test_lora_on_the_language_model_only_lowers_the_loss(composed_pair, pair_images):
    model = composed_pair.plain_copy()
    batch, gt_masks = training_batch(composed_pair.processor, pair_images)
    peft_model = prepare_for_training(model)
    lora = [name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")]
    vision, language = module_name(peft_model, model.vision_tower), module_name(peft_model, model.language_model)
    assert lora and all(name.startswith(language + ".") for name in lora), lora
    assert not [name for name in lora if name.startswith(vision + ".")]
    assert {name.split(".")[-2] for name in lora} == {"q_proj", "v_proj"}

    def loss() -> float:
        peft_model.eval()
        with torch.no_grad():
            return float(peft_model(**batch, gt_masks=gt_masks).loss)

    start = loss()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model.train()
        peft_model(**batch, gt_masks=gt_masks).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss() < start
    lora_b = [p for name, p in peft_model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(bool(p.abs().sum() > 0) for p in lora_b), "every LoRA B matrix trained"


LOADER = ISOLATE + textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoProcessor
    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "GSVAForCausalLM" and type(processor).__name__ == "GSVAProcessor"
    given = torch.load(folder + "/inputs.pt", weights_only=False)
    inputs = processor(images=given["images"], targets=given["targets"])
    out = model.decide_targets(**inputs)
    torch.save({"input_ids": inputs["input_ids"], **{k: out[k] for k in given["fields"]}}, folder + "/outputs.pt")
    """
)
FIELDS = ["slot_is_seg", "slot_mask", "slot_scores", "pred_masks", "iou_scores"]


# Every pair of the matrix; EdgeTAM only where timm imports (a saved EdgeTAM folder loads its timm backbone).
RELOADED = [(vlm, decoder) for vlm, decoder in PAIRS if decoder != "edgetam" or is_timm_available()]


@pytest.mark.slow
@pytest.mark.parametrize("vlm, decoder", RELOADED, ids=[f"{vlm}+{decoder}" for vlm, decoder in RELOADED])
def test_saved_pair_loads_with_remote_code_in_a_fresh_process(part_folder, pair_images, tmp_path, vlm, decoder):
    folder = tmp_path / "model"
    model, processor = compose_gsva(str(part_folder(vlm)), str(part_folder(decoder)), folder)
    assert {"configuration_gsva.py", "modeling_gsva.py", "processing_gsva.py"} <= set(os.listdir(folder))
    images = [np.asarray(image) for image in pair_images]
    inputs = processor(images=images, targets=TARGETS)
    composed = model.decide_targets(**inputs)
    # The saved folder, loaded here, is the reference: the composed model in memory may differ from it only in the
    # last bit of SAM's mask logits (its tensors are laid out differently in memory).
    expected = GSVAForCausalLM.from_pretrained(folder).eval().decide_targets(**inputs)
    for field in FIELDS:
        torch.testing.assert_close(expected[field], composed[field], rtol=1e-5, atol=1e-9)
    torch.save({"images": images, "targets": TARGETS, "fields": FIELDS}, folder / "inputs.pt")

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(folder / "outputs.pt", weights_only=True)
    assert torch.equal(got["input_ids"], inputs["input_ids"])
    for field in FIELDS:
        assert torch.equal(got[field], expected[field]), field


def test_a_text_only_lm_is_refused_naming_the_folder(part_folder):
    folder = str(part_folder("text_lm"))
    with pytest.raises(ValueError, match="text-only") as refused:
        compose_gsva(folder, str(part_folder("sam")))
    assert folder in str(refused.value) and "--vlm" in str(refused.value)


def test_a_mask_model_outside_the_sam_family_is_refused_naming_the_folder(part_folder):
    folder = str(part_folder("non_sam"))
    with pytest.raises(ValueError, match="SAM-family") as refused:
        compose_gsva(str(part_folder("gemma3")), folder)
    assert folder in str(refused.value) and "--mask-decoder" in str(refused.value)
