"""GSVA's teacher-forced evaluation as two full forward passes and SAM's full-size mask post-processing.

The straightforward algorithm `gsva_hf.teacher_forced.score_teacher_forced` must reproduce: the parity tests
compare against it and `bench_eval.py --reference` times it.
"""

import contextlib

import torch
import torch.nn.functional as F

from gsva_hf import teacher_forced
from gsva_hf.teacher_forced import TeacherForcedOutput


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
    reshaped_input_sizes,
    reeval=True,
    **unused,
) -> TeacherForcedOutput:
    """Decisions from the logits of one full pass; masks from a second full pass with every `[REJ]` as `[SEG]`,
    each slot's low-resolution mask upsampled in full (`full_upsample_postprocess`)."""
    first = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False)
    rejected, slot_is_seg = [], []
    for row, (positions, is_seg) in enumerate(model.target_slots(input_ids)):
        rejected.append(model.slot_decisions(first.logits[row, positions - 1], is_seg))
        slot_is_seg.append(is_seg)
    mask_ids = input_ids
    if reeval:
        mask_ids = input_ids.masked_fill(input_ids == model.config.rej_token_id, model.config.seg_token_id)
    second = model(
        input_ids=mask_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        sam_pixel_values=sam_pixel_values,
        use_cache=False,
    )
    sam_size = model.config.sam_config.vision_config.image_size
    masks = []
    for row, is_seg in enumerate(slot_is_seg):
        low_res = second.pred_masks[row, : len(is_seg)]
        masks.append(full_upsample_postprocess(low_res, reshaped_input_sizes[row], original_sizes[row], sam_size))
    return TeacherForcedOutput(rejected=rejected, pred_masks=masks, slot_is_seg=slot_is_seg)


@contextlib.contextmanager
def reference_evaluation():
    """Every `score_teacher_forced` call inside the block (the evaluation loop's included) runs
    `two_pass_score_teacher_forced`."""
    import gsva_hf.evaluation as evaluation

    saved = teacher_forced.score_teacher_forced, evaluation.score_teacher_forced
    teacher_forced.score_teacher_forced = evaluation.score_teacher_forced = two_pass_score_teacher_forced
    try:
        yield
    finally:
        teacher_forced.score_teacher_forced, evaluation.score_teacher_forced = saved
