"""GSVA's teacher-forced evaluation forward (the paper's protocol), built on the model's public parts.

The ground-truth answer is fed; at each `[SEG]`/`[REJ]` slot the decision is `model.slot_decisions` with the
ground truth, read one position earlier; with `reeval` every `[REJ]` is read as `[SEG]` and the model runs again
so every slot gets a mask. Same numbers as two full passes (`benchmarks/reference_eval.py`) with less work: the
system prompt runs once per batch (`model.run_shared_prompt`), a rerun starts at the earliest first `[REJ]` on the
first pass's KV cache, and SAM sees only the images with a masked slot.
"""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from processing_gsva import upscale_slot_masks


@dataclass
class TeacherForcedOutput(ModelOutput):
    r"""
    Output of `score_teacher_forced`, per row, one entry per ground-truth `[SEG]`/`[REJ]` slot in text order.

    Args:
        rejected (`list[torch.BoolTensor]`, each `(num_slots,)`):
            Whether the model rejects the slot (`slot_decisions` with the ground truth, read one position earlier).
        pred_masks (`list[torch.FloatTensor]`, each `(num_slots, height, width)`):
            Mask logits at the original size (every slot with `reeval`).
        slot_is_seg (`list[torch.BoolTensor]`, each `(num_slots,)`):
            The ground-truth slot tokens: True for `[SEG]`, False for `[REJ]`.
    """

    rejected: list[torch.Tensor] | None = None
    pred_masks: list[torch.Tensor] | None = None
    slot_is_seg: list[torch.Tensor] | None = None


@torch.no_grad()
def score_teacher_forced(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor,
    sam_pixel_values: torch.Tensor,
    original_sizes: torch.Tensor,
    reshaped_input_sizes: torch.Tensor,
    reeval: bool = True,
    mask_confirmed_rejections: bool = True,
    **image_inputs,
) -> TeacherForcedOutput:
    """GSVA's evaluation forward over ground-truth conversations (`**processor(images, conversations)` without
    `labels`; the sizes bring the masks to each image's original size, as `processor.post_process_masks` does).

    `mask_confirmed_rejections=False` leaves out the masks that GSVA's gRefCOCO metrics never read: a slot whose
    ground truth is `[REJ]` and which the model rejects gets the lowest float32 logit everywhere (an empty mask),
    and neither SAM nor the rerun runs for it.

    One pass up to the last slot gives the decisions (LM head at the slots only) and every state before its first
    `[REJ]`; the rows with a masked slot after their first `[REJ]` rerun from the earliest such `[REJ]` on, on the
    first pass's KV cache of the shared prefix; SAM encodes only images with a masked slot and its mask decoder runs
    once for all of them. A composed VLM (`image_inputs`: its processor's other image inputs) runs whole passes
    through its own forward instead: the first, and with reruns one more with every `[REJ]` read as `[SEG]`.
    """
    composed = model.model.is_composed
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    slots = model.target_slots(input_ids)
    first_rej = {
        row: int(positions[~is_seg][0]) for row, (positions, is_seg) in enumerate(slots) if reeval and not is_seg.all()
    }
    may_redo = any(int(slots[row][0][-1]) > position for row, position in first_rej.items())
    end = max((int(positions[-1]) for positions, _ in slots if positions.numel()), default=1)
    image_inputs = {"pixel_values": pixel_values, **image_inputs}
    if composed:
        first_states, cache = model.model.composed_states(input_ids, attention_mask, **image_inputs), None
    else:
        embeddings = model.embed_inputs(input_ids, pixel_values)[:, :end]
        first_states, cache = decode_sharing_prefix(model, embeddings, input_ids, attention_mask, use_cache=may_redo)
    slot_states, slot_is_seg, slot_mask = model.gather_slot_states(first_states, input_ids)
    counts = slot_mask.sum(1).tolist()
    gt_is_seg = [slot_is_seg[row, :n] for row, n in enumerate(counts)]
    slot_logits = model.get_output_embeddings()(slot_states[slot_mask]).split(counts)
    rejected = [model.slot_decisions(logits, is_seg) for logits, is_seg in zip(slot_logits, gt_is_seg)]
    if not reeval:
        masked = list(gt_is_seg)
    elif mask_confirmed_rejections:
        masked = [torch.ones_like(is_seg) for is_seg in gt_is_seg]
    else:
        masked = [is_seg | ~rej.to(is_seg.device) for is_seg, rej in zip(gt_is_seg, rejected)]
    # A row's states before its first [REJ] are the same in both passes: only rows with a masked slot after it
    # rerun, from the earliest such first [REJ] on.
    redo = [row for row, position in first_rej.items() if bool(masked[row][slots[row][0] > position].any())]
    if redo:
        start = min(first_rej[row] for row in redo)
        if composed:
            all_seg = input_ids.masked_fill(input_ids == model.config.rej_token_id, model.config.seg_token_id)
            rerun = model.model.composed_states(all_seg, attention_mask, **image_inputs)[redo, start:]
        else:
            rerun = rerun_from(model, start, cache, embeddings, input_ids, attention_mask, redo)
        for k, row in enumerate(redo):
            before = slots[row][0].to(rerun.device) - 1
            late = torch.nonzero(before >= start).flatten()
            slot_states[row, late] = rerun[k, before[late] - start]
    del first_states, cache
    rows = [row for row, keep in enumerate(masked) if keep.any()]
    device = sam_pixel_values.device
    masks = [torch.zeros((0, int(h), int(w)), device=device) for h, w in original_sizes.tolist()]
    if rows:
        index = torch.tensor(rows, device=device)
        sam_embeddings = model.get_sam_image_embeddings(sam_pixel_values.index_select(0, index))
        decode = torch.zeros_like(slot_mask[index.to(slot_mask.device)])
        for k, row in enumerate(rows):
            decode[k, : counts[row]] = masked[row].to(decode.device)
        low_res, _ = model.masks_from_hidden_states(slot_states[index.to(slot_states.device)], sam_embeddings, decode)
        side, square = model.config.mask_input_size, model.config.square_mask_input
        computed = upscale_slot_masks(
            low_res, decode, original_sizes[index].tolist(), reshaped_input_sizes[index].tolist(), side, square
        )
        for row, part in zip(rows, computed):
            masks[row] = part
    if not all(bool(keep.all()) for keep in masked):
        fill = 0.0 if not reeval else torch.finfo(torch.float32).min
        masks = [_scatter(values, keep, fill) for values, keep in zip(masks, masked)]
    return TeacherForcedOutput(rejected=rejected, pred_masks=masks, slot_is_seg=gt_is_seg)


def _scatter(values: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """`values` `[k, ...]` placed at the slots `keep` `[n]`; the other slots hold `fill`."""
    full = values.new_full((keep.shape[0], *values.shape[1:]), fill)
    full[keep.to(values.device)] = values
    return full


def decode_sharing_prefix(
    model, embeddings: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor, use_cache: bool
) -> tuple[torch.Tensor, object]:
    """Last-layer states `[B, L, d]` (and the KV cache) of one causal pass over `embeddings` of right-padded rows.

    The text that every row starts with, up to the image (GSVA's system prompt), runs once and its cache is
    repeated over the batch; the rest runs on it at its own positions, so each row's states are a full pass's.
    A batch of one takes the same two steps, so a row's numbers do not depend on its batch.
    """
    decoder = model.get_decoder()
    batch, length = embeddings.shape[:2]
    shared = model.shared_prompt_length(input_ids[:, :length], attention_mask[:, :length])
    if shared in (0, length):
        out = decoder(
            inputs_embeds=embeddings, attention_mask=attention_mask[:, :length], use_cache=use_cache, return_dict=True
        )
        return out.last_hidden_state, out.cache
    prompt_states, cache = model.run_shared_prompt(embeddings[:1, :shared], batch)
    tail = decoder(
        inputs_embeds=embeddings[:, shared:],
        attention_mask=attention_mask[:, :length],
        position_ids=torch.arange(shared, length, device=embeddings.device)[None],
        cache=cache,
        use_cache=True,
        return_dict=True,
    )
    states = torch.cat([prompt_states.expand(batch, -1, -1), tail.last_hidden_state], dim=1)
    return states, tail.cache if use_cache else None


def rerun_from(model, start: int, cache, embeddings, input_ids, attention_mask, redo: list[int]) -> torch.Tensor:
    """Last-layer states `[len(redo), end - start, d]` of the rows `redo` from `start` on, every `[REJ]` read
    as `[SEG]`, on the first pass's cache cropped to `start` (positions are token indices, as in a full pass)."""
    end = embeddings.shape[1]
    index = torch.tensor(redo, device=embeddings.device)
    cache.crop(start - end)
    if len(redo) < embeddings.shape[0]:
        cache.batch_select_indices(index)
    tail_ids = input_ids[index, start:end]
    seg = model.get_input_embeddings()(tail_ids.new_full((1, 1), model.config.seg_token_id))
    tail = torch.where((tail_ids == model.config.rej_token_id)[..., None], seg, embeddings[index, start:end])
    rerun = model.get_decoder()(
        inputs_embeds=tail,
        attention_mask=attention_mask[index, :end],
        position_ids=torch.arange(start, end, device=tail.device)[None],
        cache=cache,
        use_cache=True,
        return_dict=True,
    )
    return rerun.last_hidden_state


__all__ = ["TeacherForcedOutput", "decode_sharing_prefix", "rerun_from", "score_teacher_forced"]
