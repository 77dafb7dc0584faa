"""GSVAConfig / GSVAForCausalLM / GSVAProcessor on the tiny preset: losses, gradients, batching, tokens."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gsva_hf.data.prompts import multi_target_answer
from processing_gsva import (
    IGNORE_INDEX,
    SYSTEM_PROMPTS,
    eval_answer,
    eval_question,
)

RNG = np.random.default_rng(0)


def random_image(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 255, (height, width, 3), dtype=np.uint8)


def rectangle_mask(height, width, top, left, bottom, right) -> torch.Tensor:
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1
    return mask


def two_image_batch(processor):
    """Image 1 (40x50): 2 present + 1 absent target; image 2 (30x20): 1 present."""
    sentences_1 = ["the red circle", "the blue square", "the green star"]
    rejected_1 = [False, True, False]
    batch = processor(
        images=[random_image(40, 50), random_image(30, 20)],
        text=[eval_question(sentences_1), eval_question(["the dog"])],
        answers=[eval_answer(sentences_1, rejected_1), eval_answer(["the dog"], [False])],
    )
    gt = [
        torch.stack([rectangle_mask(40, 50, 5, 5, 20, 20), torch.zeros(40, 50), rectangle_mask(40, 50, 25, 30, 40, 50)]),
        rectangle_mask(30, 20, 0, 0, 10, 20)[None],
    ]
    return batch, gt


def reference_ce(logits, labels, seg_id=None, rej_id=None, target_weight=1.0):
    """Plain log-softmax CE over shifted answer tokens, weighted mean."""
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    total, weight_sum = 0.0, 0.0
    for row in range(targets.shape[0]):
        for pos in range(targets.shape[1]):
            token = int(targets[row, pos])
            if token == IGNORE_INDEX:
                continue
            weight = target_weight if token in (seg_id, rej_id) else 1.0
            total += -weight * float(log_probs[row, pos, token].detach())
            weight_sum += weight
    return total / weight_sum


def reference_mask_losses(pred_masks, gt_masks):
    """GSVA's per-mask BCE mean and Dice (scale 1000, eps 1e-6) in numpy, summed over masks."""
    bce_sum, dice_sum, count = 0.0, 0.0, 0
    for pred, gt in zip(pred_masks, gt_masks):
        for p, g in zip(pred.detach().double().numpy(), gt.double().numpy()):
            bce = np.maximum(p, 0) - p * g + np.log1p(np.exp(-np.abs(p)))
            bce_sum += bce.mean()
            sig = 1 / (1 + np.exp(-p))
            numerator = 2 * (sig / 1000 * g).sum()
            denominator = (sig / 1000).sum() + (g / 1000).sum()
            dice_sum += 1 - (numerator + 1e-6) / (denominator + 1e-6)
            count += 1
    return bce_sum / count, dice_sum / count


def full_size_masks(processor, out, batch):
    """The forward's low-resolution masks at each image's original size, by the processor (every real slot)."""
    return processor.post_process_masks(
        out.pred_masks, batch["original_sizes"], batch["reshaped_input_sizes"], slot_mask=out.slot_mask
    )


def test_loss_parts_and_weights_match_independent_computation(tiny_model, tiny_processor):
    batch, gt = two_image_batch(tiny_processor)
    out = tiny_model(**batch, gt_masks=gt)
    assert all(torch.isfinite(t) for t in (out.loss, out.ce_loss, out.mask_bce_loss, out.mask_dice_loss))

    ce = reference_ce(out.logits, batch["labels"])
    bce, dice = reference_mask_losses(full_size_masks(tiny_processor, out, batch), gt)
    assert out.ce_loss.item() == pytest.approx(1.0 * ce, rel=1e-5)
    assert out.mask_bce_loss.item() == pytest.approx(2.0 * bce, rel=1e-5)
    assert out.mask_dice_loss.item() == pytest.approx(0.5 * dice, rel=1e-5)
    assert out.loss.item() == pytest.approx(ce + 2.0 * bce + 0.5 * dice, rel=1e-5)

    tiny_model.config.ce_loss_weight, tiny_model.config.bce_loss_weight, tiny_model.config.dice_loss_weight = 0.5, 3.0, 7.0
    weighted = tiny_model(**batch, gt_masks=gt)
    assert weighted.loss.item() == pytest.approx(0.5 * ce + 3.0 * bce + 7.0 * dice, rel=1e-5)


def test_rejected_slots_get_zero_logits_and_count_in_normaliser(tiny_model, tiny_processor):
    batch, gt = two_image_batch(tiny_processor)
    out = tiny_model(**batch, gt_masks=gt)
    assert out.slot_is_seg.tolist() == [[True, False, True], [True, False, False]]
    assert out.slot_mask.tolist() == [[True, True, True], [True, False, False]]
    assert out.pred_masks.shape[:2] == (2, 3) and out.iou_scores.shape == (2, 3)
    masks = full_size_masks(tiny_processor, out, batch)
    assert [tuple(m.shape) for m in masks] == [(3, 40, 50), (1, 30, 20)]
    assert torch.count_nonzero(masks[0][1]) == 0
    assert out.iou_scores[0][1] == 0
    # A [REJ] slot with an all-zero mask adds BCE(0, 0) = ln 2 per pixel and Dice ~1, divided by all 4 targets.
    rej_bce, rej_dice = reference_mask_losses([masks[0][1:2]], [gt[0][1:2]])
    assert rej_bce == pytest.approx(np.log(2.0)) and rej_dice == pytest.approx(1.0, abs=1e-3)
    bce, dice = reference_mask_losses(masks, gt)
    seg_bce, seg_dice = reference_mask_losses([masks[0][[0, 2]], masks[1]], [gt[0][[0, 2]], gt[1]])
    assert out.mask_bce_loss.item() == pytest.approx(2.0 * bce, rel=1e-5)
    assert out.mask_dice_loss.item() == pytest.approx(0.5 * dice, rel=1e-5)
    # Normalised over the three [SEG] slots only, both parts would differ far beyond that tolerance.
    assert abs(out.mask_bce_loss.item() - 2.0 * seg_bce) > 100 * abs(out.mask_bce_loss.item() - 2.0 * bce)
    assert out.mask_dice_loss.item() != pytest.approx(0.5 * seg_dice, rel=1e-3)


def test_slot_count_mismatch_names_the_row(tiny_model, tiny_processor):
    batch, gt = two_image_batch(tiny_processor)
    with pytest.raises(ValueError, match=r"row 0: the answer has 3 \[SEG\]/\[REJ\] slots"):
        tiny_model(**batch, gt_masks=[gt[0][:2], gt[1]])


def test_the_model_returns_low_resolution_masks_and_ignores_the_processors_sizes(tiny_model, tiny_processor):
    """`original_sizes` / `reshaped_input_sizes` are the processor's post-processing inputs: other values give the
    same forward and losses (the loss takes its sizes from the ground truth), and no output holds an image size."""
    batch, gt = two_image_batch(tiny_processor)
    out = tiny_model(**batch, gt_masks=gt)
    vision = tiny_model.config.sam_config.vision_config
    side = 4 * vision.image_size // vision.patch_size  # SAM's mask decoder upscales its image embedding 4x
    assert out.pred_masks.shape == (2, 3, side, side) and out.pred_masks.dtype == torch.float32
    other = {**batch, "original_sizes": batch["original_sizes"] * 3, "reshaped_input_sizes": torch.ones_like(batch["reshaped_input_sizes"])}
    again = tiny_model(**other, gt_masks=gt)
    assert torch.equal(out.pred_masks, again.pred_masks) and torch.equal(out.loss, again.loss)
    assert not [key for key in out.keys() if "size" in key]


def test_sam_reshaped_size_is_the_processors_resize(tiny_processor):
    """The loss derives SAM's resized input size from a ground-truth mask's size: the processor's, for the tiny
    model's SAM (longest side 128) and for the released models' (1024)."""
    from processing_gsva import sam_reshaped_size

    sizes = [(40, 50), (30, 20), (1, 1), (3, 700), (127, 5), (333, 211), (128, 128), (17, 19), (1, 255), (480, 640)]
    images = [np.zeros((h, w, 3), np.uint8) for h, w in sizes]
    batch = tiny_processor(images=images, text=["x"] * len(images))
    assert batch["original_sizes"].tolist() == [list(size) for size in sizes]
    longest = tiny_processor.sam_longest_edge()
    assert [list(sam_reshaped_size(size, longest)) for size in sizes] == batch["reshaped_input_sizes"].tolist()
    sam = copy.deepcopy(tiny_processor.sam_image_processor)
    sam.size, sam.pad_size = {"longest_edge": 1024}, {"height": 1024, "width": 1024}
    resized = sam([Image.fromarray(image) for image in images], return_tensors="pt")["reshaped_input_sizes"]
    assert [list(sam_reshaped_size(size, 1024)) for size in sizes] == torch.as_tensor(resized).tolist()


def test_seg_rej_ce_weight_option(tiny_model, tiny_processor):
    batch, _ = two_image_batch(tiny_processor)
    tiny_model.config.seg_rej_ce_weight = 5.0
    out = tiny_model(**batch)
    ids = tiny_processor.token_ids
    expected = reference_ce(out.logits, batch["labels"], ids["seg_token_id"], ids["rej_token_id"], 5.0)
    assert out.ce_loss.item() == pytest.approx(expected, rel=1e-5)


GSVA_TRAINABLE = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")


def test_backward_step_changes_exactly_the_trainable_parameters(tiny_model, tiny_processor):
    batch, gt = two_image_batch(tiny_processor)
    tiny_model.train()
    for name, parameter in tiny_model.named_parameters():
        parameter.requires_grad_(any(key in name for key in GSVA_TRAINABLE))
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in tiny_model.parameters() if p.requires_grad], lr=0.5)
    tiny_model(**batch, gt_masks=gt).loss.backward()
    with_grad = {n for n, p in tiny_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    optimizer.step()
    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}

    assert changed <= with_grad <= trainable
    for required in (
        "model.text_hidden_fcs.0.0.weight",
        "model.text_hidden_fcs.0.2.weight",
        "lm_head.weight",
        "model.language_model.embed_tokens.weight",
        "model.sam.mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "model.sam.mask_decoder.output_hypernetworks_mlps.0.proj_in.weight",
    ):
        assert required in changed
    assert not any(n.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.sam.vision_encoder.")) for n in changed)
    assert not any(n.startswith("model.sam.prompt_encoder.") or ".layers." in n and "language_model" in n for n in changed)


def test_mask_loss_gradients_reach_the_llm_but_not_the_frozen_sam_encoder(tiny_model, tiny_processor):
    batch, gt = two_image_batch(tiny_processor)
    tiny_model.train()
    tiny_model.sam.vision_encoder.requires_grad_(False)
    out = tiny_model(**batch, gt_masks=gt)
    (out.mask_bce_loss + out.mask_dice_loss).backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert grads["model.language_model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith("model.sam.vision_encoder."))
    # A trainable encoder (requires_grad) is run with gradients, and they reach it.
    tiny_model.sam.vision_encoder.requires_grad_(True)
    out = tiny_model(**batch, gt_masks=gt)
    (out.mask_bce_loss + out.mask_dice_loss).backward()
    assert tiny_model.sam.vision_encoder.patch_embed.projection.weight.grad.abs().sum() > 0


def test_batched_equals_one_by_one(tiny_model, tiny_processor):
    batch, gt = two_image_batch(tiny_processor)
    with torch.no_grad():
        together = tiny_model(**batch)
        for row in range(2):
            length = int(batch["attention_mask"][row].sum())
            single = {k: v[row : row + 1] for k, v in batch.items()}
            single["input_ids"] = single["input_ids"][:, :length]
            single["attention_mask"] = single["attention_mask"][:, :length]
            single["labels"] = single["labels"][:, :length]
            alone = tiny_model(**single)
            torch.testing.assert_close(alone.logits[0], together.logits[row, :length], atol=1e-5, rtol=1e-5)
            alone_masks = full_size_masks(tiny_processor, alone, single)[0]
            together_masks = full_size_masks(tiny_processor, together, batch)[row]
            torch.testing.assert_close(alone_masks, together_masks, atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_agree_and_gradient_checkpointing_trains(tiny_config, tiny_processor):
    from modeling_gsva import GSVAForCausalLM

    batch, gt = two_image_batch(tiny_processor)
    torch.manual_seed(0)
    eager = GSVAForCausalLM._from_config(tiny_config, attn_implementation="eager").eval()
    sdpa = GSVAForCausalLM._from_config(tiny_config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    with torch.no_grad():
        a, b = eager(**batch, gt_masks=gt), sdpa(**batch, gt_masks=gt)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(a.logits[valid], b.logits[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-4, rtol=1e-4)

    sdpa.train()
    sdpa.activation_checkpointing_enable()
    out = sdpa(**batch, gt_masks=gt)
    out.loss.backward()
    assert sdpa.text_hidden_fcs[0][0].weight.grad is not None
    torch.testing.assert_close(out.loss.detach(), b.loss, atol=1e-4, rtol=1e-4)


def test_bf16_forward_gives_finite_losses(tiny_config, tiny_processor):
    from modeling_gsva import GSVAForCausalLM

    batch, gt = two_image_batch(tiny_processor)
    torch.manual_seed(0)
    model = GSVAForCausalLM(tiny_config).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(**batch, gt_masks=gt)
    assert torch.isfinite(out.loss) and out.pred_masks[0].dtype == torch.float32


# ----------------------------------------------------------------------------------------------- tokens & templates
def test_user_text_never_becomes_special_tokens(tiny_processor):
    ids = tiny_processor.token_ids
    hostile = "what is [SEG] and [REJ] <image> <im_start> <im_end> </s> <s> here"
    batch = tiny_processor(images=[random_image(8, 8)], text=[hostile], answers=["It is [SEG]."])
    row = batch["input_ids"][0].tolist()
    assert row.count(ids["seg_token_id"]) == 1
    assert row.count(ids["rej_token_id"]) == 0
    assert row.count(ids["image_token_id"]) == tiny_processor.num_image_tokens
    assert row.count(ids["im_start_token_id"]) == 1 and row.count(ids["im_end_token_id"]) == 1
    assert row.count(tiny_processor.tokenizer.eos_token_id) == 1
    assert row.count(tiny_processor.tokenizer.bos_token_id) == 1


def test_conversations_encoded_together_equal_each_encoded_alone(tiny_processor):
    """All chunks of a batch go through the tokenizer in one call; each row must be what it is on its own."""
    conversations = [
        [("what is [SEG] here?", "It is [SEG].")],
        [("a?", "Sure,the dog:[SEG], the cat:[REJ]."), ("and now?", None)],
        [("first", "one [REJ]"), ("second round", "two, [SEG] [SEG]")],
        [("no answer yet", None)],
        [("é  and\n lines", "</s> <s> plain text")],
    ]
    together = tiny_processor.encode_conversations(conversations)
    assert together == [tiny_processor.encode_conversation(rounds) for rounds in conversations]
    eos, ids = tiny_processor.tokenizer.eos_token_id, tiny_processor.token_ids
    for rounds, (row, labels) in zip(conversations, together):
        answered = [answer for _, answer in rounds if answer is not None]
        # Labels are the row's own ids wherever set: every slot token and one end-of-turn per answer.
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(row, labels))
        slots = sum(answer.count("[SEG]") + answer.count("[REJ]") for answer in answered)
        assert sum(label in (ids["seg_token_id"], ids["rej_token_id"]) for label in labels) == slots
        assert labels.count(eos) == len(answered)


def test_every_gsva_token_is_one_id_and_missing_tokens_are_refused(tiny_processor):
    from transformers import PreTrainedTokenizerFast

    from gsva_hf.presets import build_tiny_tokenizer
    from processing_gsva import GSVAProcessor

    for token in ("[SEG]", "[REJ]", "<im_start>", "<im_end>", "<image>"):
        assert len(tiny_processor.tokenizer.encode(token, add_special_tokens=False)) == 1
    ids = tiny_processor.token_ids
    assert ids["seg_token_id"] < ids["rej_token_id"] < ids["im_start_token_id"] < ids["im_end_token_id"]

    base = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer()._tokenizer)
    base = PreTrainedTokenizerFast.from_pretrained(str(_save_without_gsva_tokens(base)))
    with pytest.raises(ValueError, match="add_gsva_tokens"):
        GSVAProcessor(tiny_processor.image_processor, tiny_processor.sam_image_processor, base)


def _save_without_gsva_tokens(tokenizer):
    import json
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    tokenizer.save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    gsva = {"[SEG]", "[REJ]", "<im_start>", "<im_end>", "<image>"}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in gsva]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "additional_special_tokens", "added_tokens_decoder"):
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_vicuna_v1_template_verbatim(tiny_processor):
    system = SYSTEM_PROMPTS["llava_v1"]
    assert system == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
    )
    question = eval_question(["man in red", "the dog"])
    answer = eval_answer(["man in red", "the dog"], [False, True])
    assert question == " What are man in red, the dogin this image? Please output segmentation masks."
    assert answer == "Sure,man in red:[SEG], the dog:[REJ]."
    text = tiny_processor.prompt_text([(question, answer), ("and the cat?", "Sure, [SEG].")])
    assert text == (
        system + " USER: <im_start><image><im_end>\n" + question + " ASSISTANT: " + answer + "</s>"
        "USER: and the cat? ASSISTANT: Sure, [SEG].</s>"
    )
    assert tiny_processor.prompt_text([("what is it?", None)]).endswith("USER: <im_start><image><im_end>\nwhat is it? ASSISTANT:")
    assert multi_target_answer(["a", "b"], [False, True], style=1) == "Sure, they are a:[SEG], b:[REJ]."


def test_llama2_template_verbatim(tiny_processor):
    from processing_gsva import GSVAProcessor

    processor = GSVAProcessor(
        tiny_processor.image_processor, tiny_processor.sam_image_processor, tiny_processor.tokenizer,
        conv_template="llava_llama_2", num_image_tokens=tiny_processor.num_image_tokens,
    )
    system = SYSTEM_PROMPTS["llava_llama_2"]
    text = processor.prompt_text([("q1", "a1 [SEG]."), ("q2", "a2")])
    assert text == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<im_start><image><im_end>\nq1 [/INST] a1 [SEG]. </s>"
        "<s>[INST] q2 [/INST] a2 </s>"
    )
    batch = processor(images=[random_image(9, 9)], text=["q1"], answers=["a1 [SEG]."])
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labelled[-1] == processor.tokenizer.eos_token_id


def test_labels_cover_exactly_the_answer_and_eos(tiny_processor):
    answer = "Sure, they are the red circle:[SEG], the cat:[REJ]."
    batch = tiny_processor(images=[random_image(12, 12)], text=["Can you segment the red circle, the cat in this image?"], answers=[answer])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    labelled = (labels != IGNORE_INDEX).nonzero().flatten()
    assert labelled.tolist() == list(range(int(labelled[0]), int(labelled[-1]) + 1))
    assert torch.equal(labels[labelled], ids[labelled])
    tokens = tiny_processor.tokenizer.convert_ids_to_tokens(ids[labelled].tolist())
    assert tokens[-1] == "</s>"
    assert "".join(tokens[:-1]).replace("\u2581", "") == answer.replace(" ", "")


def test_prompt_limits_and_empty_prompts_give_clear_errors(tiny_processor):
    with pytest.raises(ValueError, match="non-empty"):
        tiny_processor(images=[random_image(8, 8)], text=["   "])
    with pytest.raises(ValueError, match="more than the limit of 100"):
        tiny_processor(images=[random_image(8, 8)], text=["word " * 80], max_length=100)
    with pytest.raises(ValueError, match="2 images but 1 conversations"):
        tiny_processor(images=[random_image(8, 8)] * 2, text=["a"])


def test_processor_checks_config_ids(tiny_processor, tiny_config):
    tiny_processor.check_config(tiny_config)
    wrong = tiny_config.__class__.from_dict({**tiny_config.to_dict(), "seg_token_id": tiny_config.rej_token_id + 100})
    with pytest.raises(ValueError, match="seg_token_id"):
        tiny_processor.check_config(wrong)


def test_left_padded_generation_prompts(tiny_processor):
    batch = tiny_processor(images=[random_image(8, 8), random_image(9, 7)], text=["a", "a much longer question here"])
    assert "labels" not in batch
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()


def test_cross_entropy_matches_torch_on_plain_labels(tiny_model, tiny_processor):
    batch, _ = two_image_batch(tiny_processor)
    out = tiny_model(**batch)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(out.ce_loss, expected)


def test_mask_path_starts_with_pytorch_default_init_and_loading_keeps_weights(tiny_config, tmp_path):
    from modeling_gsva import GSVAForCausalLM

    torch.manual_seed(0)
    model = GSVAForCausalLM(copy.deepcopy(tiny_config))
    for linear in (model.text_hidden_fcs[0][0], model.sam.mask_decoder.iou_prediction_head.proj_in):
        bound = 1 / linear.in_features**0.5  # PyTorch's kaiming_uniform(a=sqrt(5)) bound
        assert linear.weight.abs().max() <= bound and linear.weight.std() > 0.8 * bound / 3**0.5
    assert abs(float(model.sam.shared_image_embedding.positional_embedding.detach().std()) - 1.0) < 0.2
    assert abs(float(model.language_model.layers[0].mlp.up_proj.weight.detach().std()) - tiny_config.text_config.initializer_range) < 0.005
    model.save_pretrained(tmp_path)
    loaded = GSVAForCausalLM.from_pretrained(tmp_path)
    for (name, saved), (_, restored) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(saved, restored), name

    # A tensor the checkpoint lacks is drawn with GSVA's init; every loaded one stays as saved.
    from safetensors.torch import load_file, save_file

    missing = "model.sam.mask_decoder.iou_prediction_head.proj_in.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[missing]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    partial = GSVAForCausalLM.from_pretrained(tmp_path)
    drawn = partial.get_parameter(missing)
    assert not torch.equal(drawn, model.get_parameter(missing))
    assert drawn.abs().max() <= 1 / drawn.shape[1] ** 0.5 and drawn.std() > 0.8 / (3 * drawn.shape[1]) ** 0.5
    for name, saved in model.state_dict().items():
        if name != missing:
            assert torch.equal(saved, partial.state_dict()[name]), name
