"""The VLM x SAM-family pair presets: configs parse, counts on meta match independent arithmetic and published sizes."""

import pytest
import torch

from gsva_hf.pair_presets import (
    HEAD_WIDTH,
    NEW_TOKENS,
    PAIR_PRESETS,
    kv_cache_bytes,
    mask_config,
    pair_counts,
    preset,
    repvit_m1_parameters,
    saved_activation_bytes,
    vlm_config,
)

REQUIRED = ("qwen2.5-vl-3b+sam2.1-hiera-l", "qwen3-vl-4b+sam2.1-hiera-b+", "smolvlm2-2.2b+edgetam", "gsva-7b")


@pytest.fixture(scope="module")
def counts():
    return {name: pair_counts(name) for name in PAIR_PRESETS}


def test_required_presets_and_their_fields():
    for name in REQUIRED:
        entry = PAIR_PRESETS[name]
        assert {"vlm", "mask_decoder", "vlm_repo", "mask_decoder_repo", "vlm_image_size", "mask_image_size"} <= set(
            entry
        )
        assert entry["mask_image_size"] == 1024
        assert vlm_config(name).get_text_config().hidden_size > 0
        assert mask_config(name).mask_decoder_config.hidden_size == HEAD_WIDTH


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="gsva-7b"):
        preset("no-such-pair")


def test_parts_add_up_and_head_is_the_hand_count(counts):
    for name, c in counts.items():
        parts = ("vlm_vision", "vlm_language", "mask_image_encoder", "mask_decoder", "gsva_head")
        assert c["total"] == sum(c[key] for key in parts)
        assert c["bf16_weight_bytes"] == 2 * c["total"]
        d = vlm_config(name).get_text_config().hidden_size
        rows = NEW_TOKENS * d * (1 if c["tied_embeddings"] else 2)
        assert c["gsva_head"] == d * d + d + d * HEAD_WIDTH + HEAD_WIDTH + rows


def test_gsva_7b_total_is_the_meta_gsva_model(counts):
    from gsva_hf.pair_presets import _gsva_7b_config
    from modeling_gsva import GSVAForCausalLM

    with torch.device("meta"):
        model = GSVAForCausalLM(_gsva_7b_config())
    assert counts["gsva-7b"]["total"] == sum(p.numel() for p in model.parameters())


def test_published_sizes(counts):
    """SAM ViT-H / Hiera-L decoders (~4.06 M / ~4.22 M, backbones.md B.4), image encoders and VLM totals."""
    assert counts["gsva-7b"]["mask_decoder_only"] == pytest.approx(4.06e6, rel=0.01)
    assert counts["qwen2.5-vl-3b+sam2.1-hiera-l"]["mask_decoder_only"] == pytest.approx(4.22e6, rel=0.01)
    assert counts["gsva-7b"]["mask_image_encoder"] == pytest.approx(637.0e6, rel=0.01)
    assert counts["qwen2.5-vl-3b+sam2.1-hiera-l"]["mask_image_encoder"] == pytest.approx(212.7e6, rel=0.01)
    assert counts["qwen3-vl-4b+sam2.1-hiera-b+"]["mask_image_encoder"] == pytest.approx(69.1e6, rel=0.01)
    qwen25 = counts["qwen2.5-vl-3b+sam2.1-hiera-l"]
    assert qwen25["vlm_vision"] + qwen25["vlm_language"] == pytest.approx(3.75e9, rel=0.01)  # the model card's 3.75 B
    smol = counts["smolvlm2-2.2b+edgetam"]
    assert smol["vlm_vision"] + smol["vlm_language"] == pytest.approx(8.99e9 / 4, rel=0.01)  # fp32 safetensors size


def test_repvit_m1_is_the_published_size_without_its_classifier():
    """RepViT-M1 is 5.1 M with its 1000-class head (384 * 1000 + 1000 + BatchNorm): the features_only trunk is ~4.7 M."""
    assert repvit_m1_parameters() + 384 * 1000 + 1000 + 2 * 384 == pytest.approx(5.1e6, rel=0.01)


def test_kv_cache_is_the_formula():
    config = vlm_config("gsva-7b").get_text_config()
    assert kv_cache_bytes(config, 10) == 2 * 32 * 32 * 128 * 10 * 2
    config = vlm_config("qwen3-vl-4b+sam2.1-hiera-b+").get_text_config()
    assert kv_cache_bytes(config, 10) == 2 * 36 * 8 * 128 * 10 * 2


def test_saved_bytes_count_activations_once_and_never_parameters():
    with torch.device("meta"):
        layer = torch.nn.Linear(8, 4)
    x = torch.empty(3, 8, device="meta", requires_grad=True)
    # linear saves x (3x8) but not its weight, relu its output (3x4); the product saves that output again and a
    # view of x: each storage is counted once (fp32).
    assert saved_activation_bytes(lambda: (layer(x).relu() * x[:, :4]).sum()) == (3 * 8 + 3 * 4) * 4


def test_activations(counts):
    for name, c in counts.items():
        assert c["activation_bytes_frozen"] > 0, c["notes"]
        trainable = c["activation_bytes_trainable"]
        if trainable is None:
            assert any("activation_bytes_trainable" in note for note in c["notes"])
        else:
            assert trainable > c["activation_bytes_frozen"]
    assert counts["qwen2.5-vl-3b+sam2.1-hiera-l"]["activation_bytes_trainable"] is not None
