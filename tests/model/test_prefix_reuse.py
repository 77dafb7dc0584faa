"""`score_teacher_forced`'s single pass + prefix-reuse rerun against two full passes, and the cropped upsampling."""

import numpy as np
import pytest
import torch

from benchmarks.reference_eval import full_upsample_postprocess, two_pass_score_teacher_forced
from gsva_hf.teacher_forced import score_teacher_forced
from processing_gsva import eval_answer, eval_question, upscale_mask_logits

RNG = np.random.default_rng(3)
NAMES = ["the red circle", "a small blue square on the left", "the green star", "two yellow things", "the cat"]


def batch_of(processor, rows, rng=RNG):
    """rows: per image (height, width, rejected flags); sentence lengths differ so rows pad differently."""
    images, questions, answers = [], [], []
    for height, width, rejected in rows:
        images.append(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        sentences = NAMES[: len(rejected)]
        questions.append(eval_question(sentences))
        answers.append(eval_answer(sentences, rejected))
    batch = processor(images=images, text=questions, answers=answers)
    return {k: v for k, v in batch.items() if k != "labels"}


def sharpen_decisions(model, seed=1):
    """Large random `[SEG]`/`[REJ]` rows of the LM head, so the argmax at the slots varies between them."""
    generator = torch.Generator().manual_seed(seed)
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        for token in (model.config.seg_token_id, model.config.rej_token_id):
            weight[token] = 30 * torch.randn(weight.shape[1], generator=generator)


def assert_same(out, reference):
    assert len(out.pred_masks) == len(reference.pred_masks)
    for got, want, flags, want_flags in zip(out.pred_masks, reference.pred_masks, out.slot_is_seg, reference.slot_is_seg):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert flags.tolist() == want_flags.tolist()
    assert [r.tolist() for r in out.rejected] == [r.tolist() for r in reference.rejected]


MIXED = [
    (40, 50, [False, True, False, True]),  # [REJ] early, a slot after it
    (30, 20, [False]),  # no [REJ]: no rerun
    (25, 60, [False, False, True, False, True]),  # first [REJ] later, longest row
    (33, 33, [False, False, True]),  # [REJ] is the last slot: its states are all prefix states
    (18, 45, [True, True]),  # only [REJ]s
]


@pytest.mark.parametrize("reeval", [True, False])
def test_batched_mixed_rows_match_two_full_passes(tiny_model, tiny_processor, reeval):
    sharpen_decisions(tiny_model)
    batch = batch_of(tiny_processor, MIXED)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "rows should be padded differently"
    out = score_teacher_forced(tiny_model, **batch, reeval=reeval)
    reference = two_pass_score_teacher_forced(tiny_model, **batch, reeval=reeval)
    assert_same(out, reference)
    decisions = torch.cat(out.rejected)
    assert decisions.any() and not decisions.all(), "the test needs both decisions to be exercised"
    if not reeval:
        assert all(float(mask[~flags].abs().sum()) == 0 for mask, flags in zip(out.pred_masks, out.slot_is_seg))


@pytest.mark.parametrize("rejected", [[False, True, False], [False, False], [True], [True, False, True, False]])
def test_single_rows_match_two_full_passes(tiny_model, tiny_processor, rejected):
    sharpen_decisions(tiny_model)
    batch = batch_of(tiny_processor, [(37, 29, rejected)])
    assert_same(score_teacher_forced(tiny_model, **batch), two_pass_score_teacher_forced(tiny_model, **batch))


def shared_prefix(input_ids, config) -> int:
    """The system prompt: the tokens before the first image token, the same in every row."""
    shared = int(torch.nonzero(input_ids[0] == config.image_token_id)[0])
    assert (input_ids[:, :shared] == input_ids[:1, :shared]).all()
    return shared


def test_rerun_feeds_only_the_rows_and_tokens_after_the_first_rej(tiny_model, tiny_processor):
    """The system prompt runs once, then every row from there to the last slot; the rerun gets the rows with a
    slot after a [REJ], from the earliest first [REJ] on."""
    batch = batch_of(tiny_processor, MIXED)
    config = tiny_model.config
    slots = [
        torch.nonzero((row == config.seg_token_id) | (row == config.rej_token_id)).flatten()
        for row in batch["input_ids"]
    ]
    rej = [torch.nonzero(row == config.rej_token_id).flatten() for row in batch["input_ids"]]
    end = max(int(s[-1]) for s in slots)
    redo = [i for i in range(len(MIXED)) if len(rej[i]) and int(slots[i][-1]) > int(rej[i][0])]
    start = min(int(rej[i][0]) for i in redo)
    assert redo == [0, 2, 4]
    shapes = []
    decoder = tiny_model.get_decoder()
    hook = decoder.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        score_teacher_forced(tiny_model, **batch)
    finally:
        hook.remove()
    shared = shared_prefix(batch["input_ids"], config)
    assert shapes == [(1, shared), (len(MIXED), end - shared), (len(redo), end - start)]


def test_no_rej_in_the_batch_runs_the_language_model_once_over_each_token(tiny_model, tiny_processor):
    batch = batch_of(tiny_processor, [(40, 50, [False, False]), (30, 20, [False])])
    shapes = []
    hook = tiny_model.get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        out = score_teacher_forced(tiny_model, **batch)
    finally:
        hook.remove()
    shared = shared_prefix(batch["input_ids"], tiny_model.config)
    last_slot = int(torch.nonzero(batch["input_ids"] == tiny_model.config.seg_token_id)[:, 1].max())
    assert shapes == [(1, shared), (2, last_slot - shared)]
    assert_same(out, two_pass_score_teacher_forced(tiny_model, **batch))


@pytest.mark.parametrize(
    "sam_size, low, resized, original",
    [
        (1024, 256, (768, 1024), (480, 640)),
        (1024, 256, (1024, 683), (600, 400)),
        (1024, 256, (1024, 1024), (1024, 1024)),
        (128, 32, (37, 51), (23, 31)),
        (128, 32, (1, 1), (1, 1)),
        (128, 32, (127, 5), (300, 12)),
        (100, 32, (100, 75), (40, 30)),  # no integer ratio: the full upsampling path
    ],
)
def test_cropped_upsampling_equals_full_upsampling_then_crop(sam_size, low, resized, original):
    low_res = 10 * torch.randn(3, low, low, generator=torch.Generator().manual_seed(0))
    got = upscale_mask_logits(low_res, resized, original, sam_size)
    want = full_upsample_postprocess(low_res, resized, original, sam_size)
    assert got.shape == want.shape == (3, *original) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_confirmed_rejections_skip_their_masks_and_keep_the_metrics(tiny_model, tiny_processor):
    """`mask_confirmed_rejections=False`: a ground-truth [REJ] that the model rejects gets an empty mask, SAM only sees
    images with a masked slot, and GSVA's gRefCOCO metrics are exactly those of the full computation."""
    from gsva_hf.metrics import GresAccumulator

    sharpen_decisions(tiny_model, seed=1)
    batch = batch_of(tiny_processor, [*MIXED, (22, 26, [True])], rng=np.random.default_rng(3))
    seen = []
    hook = tiny_model.sam.vision_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        out = score_teacher_forced(tiny_model, **batch, mask_confirmed_rejections=False)
    finally:
        hook.remove()
    reference = two_pass_score_teacher_forced(tiny_model, **batch)
    assert [r.tolist() for r in out.rejected] == [r.tolist() for r in reference.rejected]
    confirmed = [~is_seg & rejected for is_seg, rejected in zip(out.slot_is_seg, out.rejected)]
    kinds = torch.cat([torch.stack([~is_seg & ~c, c]) for is_seg, c in zip(out.slot_is_seg, confirmed)], 1)
    assert kinds.any(1).all(), "the test needs confirmed and unconfirmed [REJ] slots"
    for got, want, skip in zip(out.pred_masks, reference.pred_masks, confirmed):
        assert got.shape == want.shape
        assert bool((got[skip] == torch.finfo(torch.float32).min).all())
        torch.testing.assert_close(got[~skip], want[~skip], atol=1e-5, rtol=1e-5)
    assert seen == [sum(1 for skip in confirmed if not skip.all())]

    # Ground truth: random for [SEG] slots, empty for [REJ] slots (what makes the slot a [REJ]).
    rng = np.random.default_rng(0)
    gts = [(rng.random(masks.shape) > 0.5) & is_seg.numpy()[:, None, None] for masks, is_seg in zip(out.pred_masks, out.slot_is_seg)]
    metrics = []
    for result in (out, reference):
        accumulator = GresAccumulator()
        for masks, rejected, gt in zip(result.pred_masks, result.rejected, gts):
            for mask, rej, target in zip(masks, rejected.tolist(), gt):
                accumulator.add(accumulator.scored_form(mask), target.astype(np.uint8), rej)
        metrics.append(accumulator.compute())
    assert metrics[0] == metrics[1]
