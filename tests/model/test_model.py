"""GSVAConfig / GSVAForCausalLM on the tiny preset: losses, gradients, batching, attention kinds, initialisation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from processing_gsva import (
    IGNORE_INDEX,
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
