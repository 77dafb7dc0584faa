"""Generation with [SEG]/[REJ], teacher-forced scoring, odd images."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from gsva_hf.data.prompts import multi_target_answer
from gsva_hf.forced_answers import ForceAnswers, answer_token_ids
from gsva_hf.teacher_forced import score_teacher_forced
from processing_gsva import MULTI_TARGET_ANSWER_STYLES

RNG = np.random.default_rng(1)


def forced_segment(model, processor, images, texts, answers, batch_size=8):
    prompt = processor(images=images[:batch_size], text=texts[:batch_size])
    forced = ForceAnswers([answer_token_ids(processor, a) for a in answers], prompt["input_ids"].shape[1], processor.tokenizer.eos_token_id)
    return model.segment(
        processor, images, text=texts, logits_processor=LogitsProcessorList([forced]), max_new_tokens=40, batch_size=batch_size
    )


def images_of(*sizes):
    return [RNG.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]


ANSWERS = ["Sure, the red circle:[SEG], the cat:[REJ], the dog:[SEG].", "It is [REJ]."]
TEXTS = ["What are the red circle, the cat, the dog in this image?", "a longer question about this other image?"]


def test_generated_slots_give_masks_flags_and_phrases(tiny_model, tiny_processor):
    results = forced_segment(tiny_model, tiny_processor, images_of((40, 50), (20, 30)), TEXTS, ANSWERS)
    first, second = results
    assert first.answer == "Sure, the red circle:[SEG], the cat:[REJ], the dog:[SEG]."
    assert [(t.phrase, t.rejected) for t in first.targets] == [("the red circle", False), ("the cat", True), ("the dog", False)]
    assert all(t.mask.shape == (40, 50) and t.mask.dtype == torch.bool for t in first.targets)
    assert not first.targets[1].mask.any()
    assert [(t.rejected, tuple(t.mask.shape)) for t in second.targets] == [(True, (20, 30))]
    assert all(0.0 < t.score <= 1.0 for t in first.targets)


def test_generate_path_equals_teacher_forced_pass(tiny_model, tiny_processor):
    images = images_of((40, 50), (20, 30))
    results = forced_segment(tiny_model, tiny_processor, images, TEXTS, ANSWERS)
    full = tiny_processor(images=images, text=TEXTS, answers=ANSWERS, padding_side="left")
    with torch.no_grad():
        out = tiny_model(**{k: v for k, v in full.items() if k != "labels"})
    masks = tiny_processor.post_process_masks(out.pred_masks, full["original_sizes"], full["reshaped_input_sizes"], out.slot_mask)
    for row, result in enumerate(results):
        for slot, target in enumerate(result.targets):
            if not target.rejected:
                expected = masks[row][slot] > 0
                assert torch.equal(target.mask, expected), (row, slot)


def test_batched_generation_equals_one_by_one(tiny_model, tiny_processor):
    images = images_of((40, 50), (20, 30))
    together = forced_segment(tiny_model, tiny_processor, images, TEXTS, ANSWERS)
    for row in range(2):
        alone = forced_segment(tiny_model, tiny_processor, images[row : row + 1], TEXTS[row : row + 1], ANSWERS[row : row + 1])[0]
        assert alone.answer == together[row].answer
        for a, b in zip(alone.targets, together[row].targets):
            assert torch.equal(a.mask, b.mask) and a.rejected == b.rejected
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_teacher_forced_decisions_follow_argmax_one_position_earlier(tiny_model, tiny_processor):
    sentences = ["the red circle", "the cat", "the dog"]
    batch = tiny_processor(
        images=images_of((40, 50)), text=[TEXTS[0]], answers=["Sure,the red circle:[SEG], the cat:[REJ], the dog:[SEG]."]
    )
    ids = tiny_processor.token_ids
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    slots = [i for i, t in enumerate(batch["input_ids"][0].tolist()) if t in (ids["seg_token_id"], ids["rej_token_id"])]
    with torch.no_grad():
        states = tiny_model(**inputs, output_hidden_states=True).hidden_states[-1][0]
        # Point the [SEG] row of lm_head at the state before the first slot: argmax there becomes [SEG].
        tiny_model.get_output_embeddings().weight[ids["seg_token_id"]] = 1e3 * states[slots[0] - 1]
        logits = tiny_model(**inputs).logits
    argmax = logits[0].argmax(-1)
    assert int(argmax[slots[0] - 1]) == ids["seg_token_id"]
    expected = []
    for position in slots:
        gt_seg = int(batch["input_ids"][0, position]) == ids["seg_token_id"]
        predicted = int(argmax[position - 1])
        expected.append(predicted != ids["seg_token_id"] if gt_seg else predicted == ids["rej_token_id"])
    out = score_teacher_forced(tiny_model, **batch)
    assert out.rejected[0].tolist() == expected
    assert out.slot_is_seg[0].tolist() == [True, False, True]
    assert len(sentences) == out.pred_masks[0].shape[0]
    assert out.pred_masks[0][1].abs().sum() > 0  # re-eval: the [REJ] slot gets a mask as well
    plain = score_teacher_forced(tiny_model, **batch, reeval=False)
    assert plain.pred_masks[0][1].abs().sum() == 0


def odd_images():
    gray = Image.fromarray(RNG.integers(0, 255, (21, 13), dtype=np.uint8), "L")
    rgba = Image.fromarray(RNG.integers(0, 255, (17, 19, 4), dtype=np.uint8), "RGBA")
    palette = gray.convert("P")
    sixteen = Image.fromarray(RNG.integers(0, 65535, (15, 22), dtype=np.uint16))
    rotated = Image.fromarray(RNG.integers(0, 255, (10, 30, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: upright size is 30 x 10 (H x W)
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif.tobytes())
    buffer.seek(0)
    exif_image = Image.open(buffer)
    one = Image.fromarray(np.zeros((1, 1, 3), np.uint8))
    wide = Image.fromarray(RNG.integers(0, 255, (3, 700, 3), dtype=np.uint8))
    return [gray, rgba, palette, sixteen, exif_image, one, wide], [(21, 13), (17, 19), (21, 13), (15, 22), (30, 10), (1, 1), (3, 700)]


def test_odd_images_give_masks_of_the_original_size(tiny_model, tiny_processor):
    images, sizes = odd_images()
    texts = ["what is this?"] * len(images)
    results = forced_segment(tiny_model, tiny_processor, images, texts, ["It is [SEG]."] * len(images))
    assert [tuple(r.targets[0].mask.shape) for r in results] == sizes


def test_bad_inputs_give_clear_errors(tiny_model, tiny_processor, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="broken.png"):
        tiny_model.segment(tiny_processor, [str(corrupt)], text="what?")
    with pytest.raises(ValueError, match="non-empty"):
        tiny_model.segment(tiny_processor, images_of((5, 5)), text="  ")
    with pytest.raises(ValueError, match="non-empty"):
        tiny_model.segment(tiny_processor, images_of((5, 5)), targets=["ok", " "])
    with pytest.raises(ValueError, match="either `text`"):
        tiny_model.segment(tiny_processor, images_of((5, 5)))
    with pytest.raises(ValueError, match="limit of 1024"):
        tiny_model.segment(tiny_processor, images_of((5, 5)), text="word " * 1200)


@pytest.mark.parametrize("style", range(len(MULTI_TARGET_ANSWER_STYLES)))
def test_answer_phrases_for_every_answer_style(tiny_processor, style):
    answer = multi_target_answer(["the red circle", "a big dog"], [False, True], style=style)
    assert tiny_processor.answer_phrases(answer) == ["the red circle", "a big dog"]
