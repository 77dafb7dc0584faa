"""The user paths through the model: generate(**processor(...)) and target mode."""

import numpy as np
import pytest
import torch
from PIL import Image

from gsva_hf.teacher_forced import score_teacher_forced
from processing_gsva import clean_sentence, eval_answer
from tests.conftest import REPO

BUNDLED = REPO / "gsva_hf" / "assets" / "gsva-tiny-synthetic"


def images_of(*sizes, seed=7):
    """Random images, the same for the same call whatever ran before."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]


class EncoderCalls:
    """Counts the images SAM's image encoder sees."""

    def __init__(self, model):
        self.images = 0
        model.sam.vision_encoder.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.images += int(args[0].shape[0])


def row_flags(out, row):
    """A row's slot flags (`slot_is_seg` without its padding)."""
    return out.slot_is_seg[row][out.slot_mask[row]]


def full_size(processor, out, inputs):
    """`out`'s low-resolution masks at the original sizes of `inputs` (the processor's output), every real slot."""
    return processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], out.slot_mask)


def sharpen_slot_tokens(model, seed=0):
    """Opposite large random `[SEG]`/`[REJ]` rows of lm_head: the full-vocabulary argmax is one of the two, and
    which one varies with the state, so decisions of both kinds occur on a random model."""
    direction = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(seed))
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight[model.config.seg_token_id] = 100.0 * direction
        weight[model.config.rej_token_id] = -100.0 * direction


def test_generate_takes_processor_output_and_runs_sam_once_per_image(tiny_model, tiny_processor):
    images = images_of((40, 50), (20, 30), (25, 25))
    batch = tiny_processor(images=images, text=["what is the red circle?", "segment the dog.", "and here?"])
    calls = EncoderCalls(tiny_model)
    plain = tiny_model.generate(**batch, max_new_tokens=12)
    assert isinstance(plain, torch.Tensor) and plain.shape[0] == 3
    assert calls.images == 0

    sharpen_slot_tokens(tiny_model)
    out = tiny_model.generate(**batch, max_new_tokens=12, return_dict_in_generate=True)
    assert calls.images == 3
    assert torch.equal(out.sequences, tiny_model.generate(**batch, max_new_tokens=12))
    prompt = batch["input_ids"].shape[1]
    slots = {tiny_model.config.seg_token_id, tiny_model.config.rej_token_id}
    assert bool(out.slot_mask.any())
    masks = full_size(tiny_processor, out, batch)
    for row, answer in enumerate(out.answer_ids):
        generated = out.sequences[row, prompt:].tolist()
        assert generated[: len(answer)] == answer.tolist()
        assert row_flags(out, row).tolist() == [t == tiny_model.config.seg_token_id for t in answer.tolist() if t in slots]
        assert masks[row].shape[1:] == tuple(batch["original_sizes"][row].tolist())


@pytest.mark.parametrize(
    "sampling",
    [{}, {"do_sample": True, "num_return_sequences": 2}, {"cache_implementation": "static"}],
    ids=["greedy", "sampling", "static-cache"],
)
def test_masks_from_generate_equal_a_full_forward_over_the_generated_answer(tiny_model, tiny_processor, sampling):
    sharpen_slot_tokens(tiny_model, seed=1)
    images = images_of((40, 50), (20, 30))
    batch = tiny_processor(images=images, text=["what is the red circle?", "a longer question about the dog here?"])
    torch.manual_seed(0)
    calls = EncoderCalls(tiny_model)
    out = tiny_model.generate(**batch, max_new_tokens=16, return_dict_in_generate=True, **sampling)
    assert calls.images == 2  # once per image, however many sequences each gets
    assert int(out.slot_is_seg.sum()) > 0
    copies = sampling.get("num_return_sequences", 1)
    repeated = {k: v.repeat_interleave(copies, dim=0) for k, v in batch.items()}
    mask = (out.sequences != tiny_processor.tokenizer.pad_token_id).long()
    mask[:, : batch["attention_mask"].shape[1]] = repeated["attention_mask"]
    with torch.no_grad():
        full = tiny_model(
            input_ids=out.sequences,
            attention_mask=mask,
            pixel_values=repeated["pixel_values"],
            sam_pixel_values=repeated["sam_pixel_values"],
        )
    generated_masks, full_masks = full_size(tiny_processor, out, repeated), full_size(tiny_processor, full, repeated)
    for row in range(2 * copies):
        count = int(out.slot_mask[row].sum())
        assert torch.equal(row_flags(full, row)[:count], row_flags(out, row))
        seg = row_flags(out, row)
        torch.testing.assert_close(generated_masks[row][seg], full_masks[row][:count][seg], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("count", range(1, 9))
def test_target_mode_returns_one_result_per_phrase_in_order(tiny_model, tiny_processor, count):
    phrases = [f"the {word} thing" for word in ["red", "big", "small", "left", "blue", "round", "green", "far"][:count]]
    result = tiny_model.segment(tiny_processor, images_of((30, 40)), targets=phrases)[0]
    assert [t.phrase for t in result.targets] == phrases
    assert all(t.mask.shape == (30, 40) and t.mask.dtype == torch.bool for t in result.targets)
    assert all(0.5 <= t.score <= 1.0 for t in result.targets)
    assert all(not t.mask.any() for t in result.targets if t.rejected)
    assert result.warnings == []


def test_target_decisions_equal_teacher_forced_scoring_of_the_models_own_answer(tiny_model, tiny_processor):
    phrases = [["man in red", "the dog", "a car", "the tree", "sky"], ["a cat"], ["left", "right", "middle"]]
    images = images_of((40, 50), (20, 30), (33, 21))
    inputs = tiny_processor(images=images, targets=phrases)
    for seed in range(50):  # a direction whose decisions mix [SEG] and [REJ] within a row
        sharpen_slot_tokens(tiny_model, seed=seed)
        decided = tiny_model.decide_targets(**inputs)
        if any(len(set(row_flags(decided, row).tolist())) == 2 for row in range(len(phrases))):
            break
    ids = tiny_model.config
    checked = 0
    for row, sentences in enumerate(phrases):
        rejected = [not flag for flag in row_flags(decided, row).tolist()]
        question = tiny_processor.targets_conversation(sentences)[0]
        answer = eval_answer([clean_sentence(s) for s in sentences], rejected)
        gt = tiny_processor(images=images[row : row + 1], text=[question], answers=[answer])
        assert torch.equal(gt["input_ids"][0][gt["attention_mask"][0].bool()], decided.sequences[row])
        scored = score_teacher_forced(tiny_model, **{k: v for k, v in gt.items() if k != "labels"})
        with torch.no_grad():
            logits = tiny_model(input_ids=gt["input_ids"], attention_mask=gt["attention_mask"], pixel_values=gt["pixel_values"]).logits
        positions = torch.nonzero(torch.isin(gt["input_ids"][0], torch.tensor([ids.seg_token_id, ids.rej_token_id]))).flatten()
        argmax = logits[0, positions - 1].argmax(-1)
        for slot, top in enumerate(argmax.tolist()):
            if top in (ids.seg_token_id, ids.rej_token_id):
                checked += 1
                assert bool(scored.rejected[0][slot]) == rejected[slot], (row, slot)
    assert checked >= 5 and any(len(set(row_flags(decided, row).tolist())) == 2 for row in range(len(phrases)))


def test_target_mode_masks_equal_a_full_forward_over_the_decided_answer(tiny_model, tiny_processor):
    sharpen_slot_tokens(tiny_model, seed=3)
    phrases = [["man in red", "the dog", "a car"], ["a cat", "the long table by the window"]]
    images = images_of((40, 50), (20, 30))
    inputs = tiny_processor(images=images, targets=phrases)
    decided = tiny_model.decide_targets(**inputs)
    decided_masks = full_size(tiny_processor, decided, inputs)
    for row in range(2):
        ids = decided.sequences[row][None]
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        with torch.no_grad():
            full = tiny_model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=single["pixel_values"],
                sam_pixel_values=single["sam_pixel_values"],
            )
        seg = row_flags(decided, row)
        torch.testing.assert_close(decided_masks[row][seg], full_size(tiny_processor, full, single)[0][seg], atol=1e-4, rtol=1e-4)
        slot_positions = torch.nonzero(torch.isin(ids[0], torch.tensor([tiny_model.config.seg_token_id, tiny_model.config.rej_token_id]))).flatten()
        expected = tiny_model.slot_scores(full.logits[0, slot_positions - 1], seg)
        torch.testing.assert_close(decided.slot_scores[row][: len(seg)], expected, atol=1e-5, rtol=1e-5)


def test_target_mode_runs_the_system_prompt_once_then_one_chunk_per_slot(tiny_model, tiny_processor):
    phrases = [["man in red", "the dog", "a car"], ["a cat"], ["left", "right"]]
    inputs = tiny_processor(images=images_of((40, 50), (20, 30), (33, 21)), targets=phrases)
    config = tiny_model.config
    rows = [ids[mask.bool()] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    shared = int(torch.nonzero(rows[0] == config.image_token_id)[0])
    assert all(torch.equal(row[:shared], rows[0][:shared]) for row in rows)
    slots = [torch.nonzero((row == config.seg_token_id) | (row == config.rej_token_id)).flatten() for row in rows]
    bounds = [[shared, *positions.tolist()] for positions in slots]
    # Per step the chunk is as wide as the longest row's: its text up to the slot (step 0), else slot token + text.
    widths = [
        max(bound[step + 1] - bound[step] if step < len(bound) - 1 else 0 for bound in bounds)
        for step in range(max(map(len, slots)))
    ]
    shapes = []
    hook = tiny_model.get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            tiny_model.decide_targets(**inputs)
    finally:
        hook.remove()
    assert shapes == [(1, shared)] + [(3, width) for width in widths]


def test_target_mode_batched_equals_one_by_one(tiny_model, tiny_processor):
    sharpen_slot_tokens(tiny_model, seed=4)
    phrases = [["man in red", "the dog", "a car", "sky"], ["a cat"], ["left", "right"]]
    images = images_of((40, 50), (20, 30), (33, 21))
    together = tiny_model.segment(tiny_processor, images, targets=phrases, batch_size=3)
    for row in range(3):
        alone = tiny_model.segment(tiny_processor, images[row : row + 1], targets=[phrases[row]])[0]
        assert alone.answer == together[row].answer
        for a, b in zip(alone.targets, together[row].targets, strict=True):
            assert a.rejected == b.rejected and a.phrase == b.phrase
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert (a.mask != b.mask).float().mean() < 1e-3


def test_question_mode_reports_the_models_phrases_and_what_it_could_not_match(tiny_model, tiny_processor):
    sharpen_slot_tokens(tiny_model, seed=5)
    images = images_of((40, 50), (20, 30))
    results = tiny_model.segment(tiny_processor, images, text=["what is the red circle?", "where is the dog?"], max_new_tokens=6)
    for result in results:
        assert len(result.targets) == result.answer.count("[SEG]") + result.answer.count("[REJ]")
        assert [t.phrase for t in result.targets] == (tiny_processor.answer_phrases(result.answer) + [""] * 9)[: len(result.targets)]
        assert any("max_new_tokens" in warning for warning in result.warnings) or result.answer
    # A random model rarely ends its answer within 6 tokens: the cut is reported, never silent.
    assert any("max_new_tokens" in warning for result in results for warning in result.warnings)


def test_generate_and_segment_on_the_bundled_model():
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    model = GSVAForCausalLM.from_pretrained(BUNDLED).eval()
    processor = GSVAProcessor.from_pretrained(BUNDLED)
    image = Image.open(REPO / "gsva_hf" / "assets" / "example.png")
    calls = EncoderCalls(model)
    batch = processor(images=[image], text=[processor.targets_question(["the red circle", "the green star"])])
    out = model.generate(**batch, max_new_tokens=40, return_dict_in_generate=True)
    assert calls.images == 1 and out.finished == [True]
    result = processor.post_process_instance_segmentation(out, target_sizes=batch["original_sizes"])[0]
    assert [t.phrase for t in result.targets] == ["the red circle", "the green star"]
    asked = ["the red circle", "the blue square", "the green star", "the dog", "the yellow triangle"]
    targets = model.segment(processor, image, targets=asked)[0].targets
    assert [t.phrase for t in targets] == asked
    assert not targets[0].rejected and targets[0].mask.any()


def test_misused_inputs_and_outputs_are_refused_with_what_to_do(tiny_model, tiny_processor):
    image = images_of((20, 30))[0]
    with pytest.raises(ValueError, match="a mix of phrases and lists"):
        tiny_model.segment(tiny_processor, [image, image], targets=[["the red circle"], "blue"])
    with pytest.raises(ValueError, match="not a string"):
        tiny_processor(images=image, targets="the red circle")
    with pytest.raises(ValueError, match="one result per image"):
        tiny_model.segment(tiny_processor, image, text="what?", do_sample=True, num_return_sequences=2)
    inputs = tiny_processor(images=image, targets=["a", "b"])
    with pytest.raises(ValueError, match="needs sam_pixel_values"):
        tiny_model.decide_targets(**{k: v for k, v in inputs.items() if k != "sam_pixel_values"})
    decided = tiny_model.decide_targets(**inputs)
    with pytest.raises(ValueError, match=r'needs target_sizes.*target_sizes=inputs\["original_sizes"\]'):
        tiny_processor.post_process_instance_segmentation(decided, targets=[["a", "b"]])
    sizes = inputs["original_sizes"]
    with pytest.raises(ValueError, match="got 2 target lists for 1 images"):
        tiny_processor.post_process_instance_segmentation(decided, target_sizes=sizes, targets=[["a", "b"], ["c"]])
    with pytest.raises(ValueError, match=r"got 2 target_sizes for 1 output rows.*repeat_interleave"):
        tiny_processor.post_process_instance_segmentation(decided, target_sizes=sizes.repeat(2, 1), targets=[["a", "b"]])
    prompt = tiny_processor(images=image, text="what?")
    plain = tiny_model.generate(input_ids=prompt["input_ids"], pixel_values=prompt["pixel_values"], max_new_tokens=3, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="hold no masks"):
        tiny_processor.post_process_instance_segmentation(plain)


def test_phrases_are_normalised_once_for_the_prompt_and_the_answer(tiny_processor):
    question, answer = tiny_processor.targets_conversation([". The Red circle .", "the red\ncircle", "a.b"])
    assert question == " What are the red circle, the red circle, a.bin this image? Please output segmentation masks."
    assert answer == "Sure,the red circle:[SEG], the red circle:[SEG], a.b:[SEG]."


def test_generation_config_and_own_suppressed_tokens_are_honoured(tiny_model, tiny_processor):
    from transformers import GenerationConfig

    sharpen_slot_tokens(tiny_model, seed=1)
    batch = tiny_processor(images=images_of((40, 50)), text=["what is the red circle?"])
    config = GenerationConfig(max_new_tokens=8, return_dict_in_generate=True, suppress_tokens=[5])
    out = tiny_model.generate(**batch, generation_config=config)
    assert out.slot_is_seg is not None and config.suppress_tokens == [5]
    # The image token is suppressed alongside the caller's own: pushing it to the top still never generates it.
    image_id = tiny_model.config.image_token_id
    ids = tiny_model.generate(**batch, max_new_tokens=4, suppress_tokens=[5], sequence_bias={(image_id,): 1e4})
    assert image_id not in ids[0, batch["input_ids"].shape[1] :].tolist()
