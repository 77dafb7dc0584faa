"""GSVA's teacher-forced evaluation as two full forward passes and SAM's full-size mask post-processing.

The straightforward algorithm `GSVAForCausalLM.score_teacher_forced` must reproduce: the parity tests compare
against it and `bench_eval.py --reference` times it.
"""

import contextlib

import torch
import torch.nn.functional as F

from modeling_gsva import GSVAForCausalLM, GSVATeacherForcedOutput


def full_upsample_postprocess(low_res: torch.Tensor, resized_size, original_size, sam_size: int) -> torch.Tensor:
    """Upsample every mask to `sam_size` x `sam_size`, crop the resized image, resize to the original size."""
    logits = F.interpolate(low_res[:, None].float(), (sam_size, sam_size), mode="bilinear", align_corners=False)
    logits = logits[..., : int(resized_size[0]), : int(resized_size[1])]
    logits = F.interpolate(logits, tuple(int(v) for v in original_size), mode="bilinear", align_corners=False)
    return logits[:, 0]


@torch.no_grad()
def two_pass_score_teacher_forced(
    model,
    input_ids,
    attention_mask,
    pixel_values,
    sam_pixel_values,
    original_sizes,
    resized_sizes,
    reeval=True,
    **unused,
) -> GSVATeacherForcedOutput:
    """Decisions from the logits of one full pass; masks from a second full pass with every `[REJ]` as `[SEG]`."""
    first = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False)
    rejected, gt_is_seg = [], []
    for row, (positions, is_seg) in enumerate(model.target_slots(input_ids)):
        rejected.append(model.slot_decisions(first.logits[row, positions - 1], is_seg))
        gt_is_seg.append(is_seg)
    mask_ids = input_ids
    if reeval:
        mask_ids = input_ids.masked_fill(input_ids == model.config.rej_token_id, model.config.seg_token_id)
    with full_postprocessing():
        second = model(
            input_ids=mask_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            sam_pixel_values=sam_pixel_values,
            original_sizes=original_sizes,
            resized_sizes=resized_sizes,
            use_cache=False,
        )
    return GSVATeacherForcedOutput(predicted_rejected=rejected, pred_masks=second.pred_masks, gt_is_seg=gt_is_seg)


@contextlib.contextmanager
def full_postprocessing():
    """`GSVAForCausalLM.postprocess_masks` replaced by `full_upsample_postprocess` inside the block."""
    saved = GSVAForCausalLM.__dict__["postprocess_masks"]
    GSVAForCausalLM.postprocess_masks = staticmethod(full_upsample_postprocess)
    try:
        yield
    finally:
        GSVAForCausalLM.postprocess_masks = saved


@contextlib.contextmanager
def reference_evaluation():
    """Every `score_teacher_forced` call inside the block runs `two_pass_score_teacher_forced`."""
    saved = GSVAForCausalLM.__dict__["score_teacher_forced"]
    GSVAForCausalLM.score_teacher_forced = two_pass_score_teacher_forced
    try:
        yield
    finally:
        GSVAForCausalLM.score_teacher_forced = saved
