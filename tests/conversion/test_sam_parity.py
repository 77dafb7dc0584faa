"""The segment-anything → transformers SAM key mapping, checked against segment-anything's own model.

A small random `Sam` from the `segment-anything` package is converted with `convert_sam_state_dict` into the
`sam` of a GSVA model; GSVA's mask path (`get_sam_image_embeddings`, the mask decoder call and post-processing
of `masks_from_hidden_states`) must reproduce segment-anything's image embeddings, low-res logits, IoU and
full-size logits within 1e-4.
"""

import pytest
import torch

from configuration_gsva import GSVAConfig
from gsva_hf.conversion import ConversionError, convert_sam_state_dict, sam_config_from_shapes, sam_rename_plan
from modeling_gsva import GSVAForCausalLM
from processing_gsva import upscale_mask_logits
from tests._sam_reference import (
    IMAGE_SIZE,
    PROMPT_WIDTH,
    build_sam,
    hf_sam_config,
    identity_text_hidden_fcs,
    lift_prompts,
    reference_masks,
    segment_anything_modeling,
)

TOLERANCE = dict(atol=1e-4, rtol=1e-4)
TEXT_WIDTH = 2 * PROMPT_WIDTH


@pytest.fixture(scope="module")
def reference_sam():
    with segment_anything_modeling() as modeling:
        return build_sam(modeling, seed=0)


def gsva_config(sam_config: dict) -> GSVAConfig:
    return GSVAConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16,
        ),
        text_config=dict(
            model_type="llama", hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
        ),
        sam_config=sam_config,
        out_dim=PROMPT_WIDTH,
        image_token_id=59,
        seg_token_id=60,
        rej_token_id=61,
        im_start_token_id=62,
        im_end_token_id=63,
    )


@pytest.fixture(scope="module")
def converted(reference_sam):
    torch.manual_seed(0)
    model = GSVAForCausalLM(gsva_config(hf_sam_config())).eval()
    state = convert_sam_state_dict(reference_sam.state_dict(), model.sam)
    model.sam.load_state_dict(state, strict=True)
    identity_text_hidden_fcs(model)
    return model


def test_inferred_config_matches_the_checkpoint(reference_sam):
    shapes = {k: v.shape for k, v in reference_sam.state_dict().items()}
    inferred = sam_config_from_shapes(shapes, decoder_heads=2).to_dict()
    wanted = hf_sam_config()
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        for name, value in wanted[part].items():
            assert inferred[part][name] == value, (part, name)


def test_every_key_is_mapped(reference_sam, converted):
    plan = sam_rename_plan(reference_sam.state_dict())
    assert plan["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == [
        "shared_image_embedding.positional_embedding",
        "prompt_encoder.shared_embedding.positional_embedding",
    ]
    assert plan["mask_decoder.iou_prediction_head.layers.1.weight"] == ["mask_decoder.iou_prediction_head.layers.0.weight"]
    assert plan["mask_decoder.output_hypernetworks_mlps.3.layers.2.bias"] == ["mask_decoder.output_hypernetworks_mlps.3.proj_out.bias"]
    produced = {name for names in plan.values() for name in names}
    assert produced == set(converted.sam.state_dict())


@torch.no_grad()
def test_gsva_mask_path_matches_segment_anything(reference_sam, converted):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    prompts = torch.randn(3, PROMPT_WIDTH, generator=generator)
    resized, original = (48, 64), (60, 80)
    ref_embedding, ref_low, ref_iou, ref_full = reference_masks(reference_sam, image, prompts, resized, original)

    embedding = converted.get_sam_image_embeddings(image)
    torch.testing.assert_close(embedding, ref_embedding, **TOLERANCE)

    sam = converted.sam
    torch.testing.assert_close(sam.get_image_wide_positional_embeddings(), reference_sam.prompt_encoder.get_dense_pe(), **TOLERANCE)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *embedding.shape[-2:])
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
        sparse_prompt_embeddings=prompts[None, :, None, :],
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    torch.testing.assert_close(low_res[0, :, 0], ref_low, **TOLERANCE)
    torch.testing.assert_close(iou[0, :, 0], ref_iou, **TOLERANCE)

    states = lift_prompts(prompts, TEXT_WIDTH)[None]
    low_res, scores = converted.masks_from_hidden_states(states, embedding, torch.ones(states.shape[:2], dtype=torch.bool))
    torch.testing.assert_close(low_res[0], ref_low, **TOLERANCE)
    masks = upscale_mask_logits(low_res[0], resized, original, converted.config.sam_config.vision_config.image_size)
    assert masks.shape == (3, *original)
    torch.testing.assert_close(masks, ref_full, **TOLERANCE)
    torch.testing.assert_close(scores[0], ref_iou, **TOLERANCE)


def test_missing_extra_and_misshaped_tensors_are_named(reference_sam, converted):
    state = dict(reference_sam.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(2, 2)
    state["image_encoder.neck.0.weight"] = torch.zeros(7, 32, 1, 1)
    with pytest.raises(ConversionError) as error:
        convert_sam_state_dict(state, converted.sam)
    message = str(error.value)
    assert "mask_decoder.iou_token.weight [1, 16]" in message
    assert "mask_decoder.extra_head.weight" in message
    assert "image_encoder.neck.0.weight -> vision_encoder.neck.conv1.weight: checkpoint [7, 32, 1, 1], model expects [16, 32, 1, 1]" in message


def test_pixel_statistics_are_dropped(reference_sam, converted):
    state = dict(reference_sam.state_dict())
    state["pixel_mean"] = torch.zeros(3, 1, 1)
    state["pixel_std"] = torch.ones(3, 1, 1)
    assert set(convert_sam_state_dict(state, converted.sam)) == set(converted.sam.state_dict())


def test_segment_anything_import_leaves_sys_modules_as_it_was():
    import sys

    before = {name for name in sys.modules if name.startswith("segment_anything")}
    with segment_anything_modeling() as modeling:
        assert hasattr(modeling, "Sam")
        assert "segment_anything.predictor" not in sys.modules
    assert {name for name in sys.modules if name.startswith("segment_anything")} == before
