"""Units of the composed path: the config's two layouts, SAM 2's mask step and post-processing, size checks."""

import json

import pytest
import torch
import torch.nn.functional as F

from configuration_gsva import GSVAConfig
from gsva_hf.tiny_parts import tiny_mask_decoder_config, tiny_vlm_config
from modeling_gsva import GSVAForCausalLM
from processing_gsva import mask_input_size, upscale_mask_logits


def composed_config(sam="sam2", **extra):
    vlm = tiny_vlm_config("qwen2_5_vl")
    mask = tiny_mask_decoder_config(sam)
    ids = dict(image_token_id=vlm.image_token_id, im_start_token_id=None, im_end_token_id=None)
    ids.update(seg_token_id=5, rej_token_id=6)
    return GSVAConfig(vlm_config=vlm, sam_config=mask, out_dim=mask.prompt_encoder_config.hidden_size, **{**ids, **extra})


def test_a_composed_config_round_trips_without_llava_parts(tmp_path):
    config = composed_config()
    assert config.vision_config is None and config.text_config is None
    assert config.get_text_config().hidden_size == config.vlm_config.get_text_config().hidden_size
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vlm_config"]["model_type"] == "qwen2_5_vl" and saved.get("vision_config") is None
    again = GSVAConfig.from_pretrained(tmp_path)
    assert again.backbone_type == "qwen2_5_vl" and again.square_mask_input and again.mask_input_size == 256
    assert GSVAConfig().backbone_type == "llava_v1" and GSVAConfig().vision_config.model_type == "clip_vision_model"


def test_configs_gsva_cannot_use_are_refused():
    with pytest.raises(ValueError, match="not both"):
        composed_config(text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="SAM-family"):
        GSVAConfig(sam_config={"model_type": "detr"})
    multimask = tiny_mask_decoder_config("sam2")
    multimask.mask_decoder_config.dynamic_multimask_via_stability = True
    with pytest.raises(ValueError, match="dynamic_multimask_via_stability"):
        GSVAConfig.from_dict({**composed_config().to_dict(), "sam_config": multimask.to_dict()})
    with pytest.raises(ValueError, match="image token"):
        composed_config(image_token_id=3)


def test_sam2_mask_step_equals_sam2s_own_decoder_and_trains_its_convs():
    """The mask step on `get_sam_image_embeddings` equals SAM 2's decoder on its own `get_image_embeddings`, and
    the decoder's conv_s0/conv_s1 (run without gradients by SAM 2's method) get gradients here."""
    torch.manual_seed(0)
    model = GSVAForCausalLM(composed_config()).eval()
    sam = model.model.sam
    pixels = torch.randn(2, 3, 256, 256)
    states = torch.randn(2, 2, model.config.get_text_config().hidden_size)
    decode = torch.tensor([[True, True], [True, False]])
    masks, iou = model.masks_from_hidden_states(states, model.get_sam_image_embeddings(pixels), decode)
    reference = sam.get_image_embeddings(pixels)
    prompts = model.model.text_hidden_fcs[0](states[decode])
    owner = torch.tensor([0, 0, 1])
    side = reference[-1].shape[-1]
    expected = sam.mask_decoder(
        image_embeddings=reference[-1][owner],
        image_positional_embeddings=sam.get_image_wide_positional_embeddings().expand(3, -1, -1, -1),
        sparse_prompt_embeddings=prompts[:, None, None, :],
        dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(3, -1, side, side),
        multimask_output=False,
        high_resolution_features=[level[owner] for level in reference[:-1]],
    )
    assert torch.allclose(masks[decode], expected[0][:, 0, 0], atol=1e-5)
    assert torch.allclose(iou[decode], expected[1][:, 0, 0], atol=1e-5)
    assert bool((masks[~decode] == 0).all())
    model.train()
    low_res, _ = model.masks_from_hidden_states(states, model.get_sam_image_embeddings(pixels), decode)
    low_res.sum().backward()
    for conv in (sam.mask_decoder.conv_s0, sam.mask_decoder.conv_s1):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_square_masks_come_back_in_one_resize():
    """SAM 2's rule: the low-resolution logits resized once to the image, not SAM's pad-and-crop."""
    low_res = torch.randn(3, 64, 64)
    out = upscale_mask_logits(low_res, (256, 256), (90, 120), 256, square=True)
    assert torch.equal(out, F.interpolate(low_res[:, None], (90, 120), mode="bilinear", align_corners=False)[:, 0])
    assert mask_input_size((90, 120), 256, True) == (256, 256)
    assert mask_input_size((90, 120), 256, False) == (192, 256)


def test_a_composed_checkpoint_with_other_sizes_is_refused_before_loading(tmp_path):
    from gsva_hf.loading import IncompleteCheckpointError, check_weights_match_config

    config = composed_config()
    torch.manual_seed(0)
    GSVAForCausalLM(config).save_pretrained(tmp_path)
    check_weights_match_config(tmp_path, config)
    bigger = composed_config()
    bigger.vlm_config.get_text_config().intermediate_size *= 2
    with pytest.raises(IncompleteCheckpointError, match="tensors"):
        check_weights_match_config(tmp_path, bigger)
    loaded, info = GSVAForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_composing_twice_with_one_seed_gives_the_same_weights(part_folder):
    """The new [SEG]/[REJ] rows (drawn around the mean of the old rows) and text_hidden_fcs follow the seed."""
    from gsva_hf.compose import compose_gsva

    first, _ = compose_gsva(str(part_folder("llava")), str(part_folder("sam")), seed=3)
    again, _ = compose_gsva(str(part_folder("llava")), str(part_folder("sam")), seed=3)
    other, _ = compose_gsva(str(part_folder("llava")), str(part_folder("sam")), seed=4)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    rows = first.get_input_embeddings().weight[-2:]
    assert not torch.equal(rows, other.get_input_embeddings().weight[-2:])
    assert not torch.equal(a["model.text_hidden_fcs.0.0.weight"], c["model.text_hidden_fcs.0.0.weight"])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "idefics3"])
def test_typed_special_tokens_stay_text_and_the_turn_end_is_trained(part_folder, family):
    """Text a user types that spells a special token of the VLM (`<|image_pad|>`, `<end_of_turn>`, `[SEG]`) is
    tokenized as text; the answer's `[SEG]` and the token closing the assistant's turn are labelled."""
    from PIL import Image

    from gsva_hf.compose import compose_gsva

    _, processor = compose_gsva(str(part_folder(family)), str(part_folder("sam")))
    tokenizer = processor.tokenizer
    specials = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    typed = "Is <|image_pad|> or <end_of_turn> or <image> or [SEG] here?"
    batch = processor(images=Image.new("RGB", (40, 30)), text=typed, answers="It is [SEG].")
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    image = processor.token_ids["image_token_id"]
    assert ids.count(processor.token_ids["seg_token_id"]) == 1
    plain = processor(images=Image.new("RGB", (40, 30)), text="Is here?", answers="It is [SEG].")["input_ids"][0].tolist()
    assert sum(i in specials for i in ids) == sum(i in specials for i in plain)
    assert ids.count(image) == plain.count(image)
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert trained[-1] in specials and processor.token_ids["seg_token_id"] in trained
