"""Real VLM x SAM-family pairs for a generalised GSVA, sized on the meta device (no weights, no download).

Each preset names a released VLM (`AutoModelForImageTextToText`) and a released SAM-family model and holds their
architecture fields as plain dicts, written from the public `config.json` of the checkpoints (sources and unconfirmed
values are noted beside each). `pair_counts(name)` builds both models and GSVA's head on `torch.device("meta")` and
reports parameters per part, bf16 weight bytes, the bytes autograd saves for backward in one training forward, and the
KV cache of the prompt. `python benchmarks/pair_presets_table.py` prints the table.

What the training forward measures (batch 1): one image at the preset's VLM size, a `PROMPT_TEXT_TOKENS`-token text
prompt around it, a `ANSWER_TOKENS`-token answer holding `SEG_TOKENS` `[SEG]`; the LM loss (logits upcast to fp32, as
transformers' causal-LM loss does), `text_hidden_fcs` on the `[SEG]` states, one SAM-family decoder call with those
prompts, GSVA's BCE + Dice on the 256x256 low-resolution masks. Parameters are never counted as activations.
"""

import copy
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.utils import is_timm_available

HEAD_WIDTH = 256  # the prompt width C of every released SAM-family decoder
PROMPT_TEXT_TOKENS = 32  # system prompt, chat turns and the question around the image
ANSWER_TOKENS = 64
SEG_TOKENS = 3
NEW_TOKENS = 2  # [SEG], [REJ]
MASK_IMAGE_SIZE = 1024

# SAM 2.1 Hiera trunks, from facebookresearch/sam2 `sam2/configs/sam2.1/sam2.1_hiera_{b+,l}.yaml` (and
# `sam2/modeling/backbones/hieradet.py` defaults for what a yaml leaves out), in transformers' Sam2HieraDetConfig names.
_HIERA = {
    "b+": dict(hidden_size=112, num_attention_heads=2, blocks_per_stage=[2, 3, 16, 3],
               global_attention_blocks=[12, 16, 20], window_size_per_stage=[8, 4, 14, 7],
               window_positional_embedding_background_size=[14, 14]),
    "l": dict(hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4],
              global_attention_blocks=[23, 33, 43], window_size_per_stage=[8, 4, 16, 8],
              window_positional_embedding_background_size=[7, 7]),
}  # fmt: skip


def _sam2_config(size: str) -> dict:
    """`Sam2Config` kwargs of facebook/sam2.1-hiera-{base-plus,large} (image model; no video memory modules)."""
    trunk = dict(_HIERA[size], model_type="sam2_hiera_det_model")
    width = trunk["hidden_size"]
    trunk["embed_dim_per_stage"] = [width * 2**i for i in range(4)]
    trunk["num_attention_heads_per_stage"] = [trunk["num_attention_heads"] * 2**i for i in range(4)]
    vision = dict(model_type="sam2_vision_model", backbone_config=trunk,
                  backbone_channel_list=trunk["embed_dim_per_stage"][::-1])  # fmt: skip
    return dict(model_type="sam2", vision_config=vision, prompt_encoder_config={}, mask_decoder_config={})


def _gsva_7b_config():
    from gsva_hf.presets import large_presets

    return large_presets()["gsva-7b"][0]


def _gsva_7b_entry() -> dict:
    """The original GSVA-7B: LLaVA-Lightning-7B-v1-1 (CLIP ViT-L/14 at 224 px, LLaMA-7B) + SAM ViT-H."""
    config = _gsva_7b_config()
    vlm = {"vision_config": config.vision_config.to_dict(), "text_config": config.text_config.to_dict()}
    return {
        "gsva_preset": "gsva-7b",  # counted as `GSVAForCausalLM(large_presets()["gsva-7b"])`
        "vlm": vlm,
        "mask_decoder": dict(config.sam_config.to_dict(), model_type="sam"),
        "vlm_repo": "liuhaotian/LLaVA-Lightning-7B-delta-v1-1 (+ openai/clip-vit-large-patch14)",
        "mask_decoder_repo": "facebook/sam-vit-huge",
        "vlm_image_size": 224,
        "mask_image_size": MASK_IMAGE_SIZE,
    }


PAIR_PRESETS = {
    # Qwen/Qwen2.5-VL-3B-Instruct config.json (as transcribed in public repositories; vision `depth`,
    # `intermediate_size` 3420, `fullatt_block_indexes` also match the class defaults of the 7B).
    "qwen2.5-vl-3b+sam2.1-hiera-l": {
        "vlm": dict(
            model_type="qwen2_5_vl",
            text_config=dict(
                hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True,
            ),
            vision_config=dict(
                depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31],
            ),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
            tie_word_embeddings=True,
        ),
        "mask_decoder": _sam2_config("l"),
        "vlm_repo": "Qwen/Qwen2.5-VL-3B-Instruct",
        "mask_decoder_repo": "facebook/sam2.1-hiera-large",
        "vlm_image_size": 448,  # 32x32 patches of 14 px -> 256 tokens after the 2x2 merge
        "mask_image_size": MASK_IMAGE_SIZE,
    },
    # Qwen/Qwen3-VL-4B-Instruct config.json (as mirrored verbatim in public repositories).
    "qwen3-vl-4b+sam2.1-hiera-b+": {
        "vlm": dict(
            model_type="qwen3_vl",
            text_config=dict(
                hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                max_position_embeddings=262144, rope_theta=5000000,
                rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                attention_bias=False, tie_word_embeddings=True,
            ),
            vision_config=dict(
                depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh",
            ),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
            tie_word_embeddings=True,
        ),
        "mask_decoder": _sam2_config("b+"),
        "vlm_repo": "Qwen/Qwen3-VL-4B-Instruct",
        "mask_decoder_repo": "facebook/sam2.1-hiera-base-plus",
        "vlm_image_size": 448,  # 28x28 patches of 16 px -> 196 tokens after the 2x2 merge
        "mask_image_size": MASK_IMAGE_SIZE,
    },
    # HuggingFaceTB/SmolVLM2-2.2B-Instruct config.json: SigLIP-SO400M-style tower at 384 px / patch 14, pixel
    # shuffle 3, SmolLM2-1.7B text (24 layers, 2048 wide, 32 heads = 32 KV heads, rope 130000, 49280 tokens),
    # untied lm_head. Unconfirmed here (SmolLM2-1.7B's value, not read from this checkpoint): intermediate_size 8192.
    # Cross-check: the checkpoint's fp32 safetensors are 8.99 GB, i.e. ~2.25 B parameters, which this matches.
    "smolvlm2-2.2b+edgetam": {
        "vlm": dict(
            model_type="smolvlm",
            text_config=dict(
                model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                num_attention_heads=32, num_key_value_heads=32, head_dim=64, vocab_size=49280, rms_norm_eps=1e-5,
                max_position_embeddings=8192, rope_theta=130000.0, tie_word_embeddings=False,
            ),
            vision_config=dict(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14,
            ),
            scale_factor=3, image_token_id=49190, tie_word_embeddings=False,
        ),
        # yonigozlan/EdgeTAM-hf: not read here; transformers' EdgeTam*Config defaults (documented for that
        # checkpoint) with the RepViT-M1 backbone named explicitly (the default's key is misspelt, backbones.md 0.11).
        "mask_decoder": dict(
            model_type="edgetam",
            vision_config=dict(
                model_type="edgetam_vision_model",
                backbone_config=dict(model_type="timm_wrapper", architecture="repvit_m1",
                                     model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}),
                backbone_channel_list=[384, 192, 96, 48],
                backbone_feature_sizes=[[256, 256], [128, 128], [64, 64]],
                fpn_hidden_size=256, fpn_kernel_size=1, fpn_stride=1, fpn_padding=0, fpn_top_down_levels=[2, 3],
                num_feature_levels=3,
            ),
            prompt_encoder_config={}, mask_decoder_config={},
        ),  # fmt: skip
        "vlm_repo": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        "mask_decoder_repo": "yonigozlan/EdgeTAM-hf",
        "vlm_image_size": 768,  # 2x2 crops of 384 px + the global view: 5 x 81 tokens
        "mask_image_size": MASK_IMAGE_SIZE,
    },
}  # fmt: skip
PAIR_PRESETS["gsva-7b"] = _gsva_7b_entry()


def preset(name: str) -> dict:
    """The preset `name` (a deep copy), or one error listing the known names."""
    if name not in PAIR_PRESETS:
        raise ValueError(f"pair preset {name!r} is unknown; expected one of {sorted(PAIR_PRESETS)}")
    return copy.deepcopy(PAIR_PRESETS[name])


def vlm_config(name: str):
    """The VLM's config (`AutoConfig.for_model`), sdpa attention."""
    entry = preset(name)
    if "gsva_preset" in entry:
        return _gsva_7b_config()
    vlm = entry["vlm"]
    config = AutoConfig.for_model(vlm.pop("model_type"), **vlm)
    config._attn_implementation = "sdpa"
    return config


def mask_config(name: str):
    """The SAM-family model's config (`AutoConfig.for_model`).

    EdgeTAM's config holds a `TimmWrapperConfig`, which cannot be built without timm: there, the prompt encoder and
    mask decoder configs are the real classes and the vision config a namespace of the neck's fields.
    """
    mask = preset(name)["mask_decoder"]
    model_type = mask.pop("model_type")
    if model_type == "edgetam" and not is_timm_available():
        from transformers import EdgeTamMaskDecoderConfig, EdgeTamPromptEncoderConfig

        vision = {k: v for k, v in mask["vision_config"].items() if k not in ("model_type", "backbone_config")}
        return SimpleNamespace(
            model_type=model_type,
            vision_config=SimpleNamespace(**vision),
            prompt_encoder_config=EdgeTamPromptEncoderConfig(**mask["prompt_encoder_config"]),
            mask_decoder_config=EdgeTamMaskDecoderConfig(**mask["mask_decoder_config"]),
        )
    return AutoConfig.for_model(model_type, **mask)


# ---------------------------------------------------------------- RepViT-M1 (EdgeTAM's timm backbone), analytically

REPVIT_M1 = dict(embed_dim=(48, 96, 192, 384), depth=(2, 2, 14, 2), mlp_ratio=2)
REPVIT_M1_PUBLISHED_M = 5.1  # RepViT paper (arXiv 2307.09283), RepViT-M1 / M0.9, reparameterised, ImageNet head


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> int:
    return c_in // groups * c_out * kernel * kernel + 2 * c_out  # bias-free conv + BatchNorm weight and bias


def _se_width(channels: int) -> int:
    """timm's `make_divisible(channels * 0.25, 8)` for the squeeze-excite bottleneck."""
    value = channels * 0.25
    return max(8, int(value + 4) // 8 * 8)


def _repvit_block(dim: int, mlp_ratio: int, use_se: bool) -> int:
    token_mixer = _conv_bn(dim, dim, 3, dim) + _conv_bn(dim, dim, 1, dim)  # legacy RepVggDw: 3x3 dw + 1x1 dw
    hidden = _se_width(dim)
    se = 2 * dim * hidden + hidden + dim if use_se else 0
    channel_mixer = _conv_bn(dim, dim * mlp_ratio) + _conv_bn(dim * mlp_ratio, dim)
    return token_mixer + se + channel_mixer


def repvit_m1_parameters() -> int:
    """Trainable parameters of timm's `repvit_m1` with `features_only=True` (no classifier), unfused (train form).

    Written from timm's RepViT layout (stem of two 3x3 stride-2 conv-BN; per later stage a downsample = one block
    without SE, a 3x3 depthwise stride-2 conv-BN, a 1x1 conv-BN and an MLP; blocks alternate SE on/off starting on).
    """
    dims, depths, ratio = REPVIT_M1["embed_dim"], REPVIT_M1["depth"], REPVIT_M1["mlp_ratio"]
    total = _conv_bn(3, dims[0] // 2, 3) + _conv_bn(dims[0] // 2, dims[0], 3)
    for stage, (dim, depth) in enumerate(zip(dims, depths)):
        if stage:
            prev = dims[stage - 1]
            total += _repvit_block(prev, ratio, False) + _conv_bn(prev, prev, 3, prev) + _conv_bn(prev, dim)
            total += _conv_bn(dim, dim * ratio) + _conv_bn(dim * ratio, dim)
        total += sum(_repvit_block(dim, ratio, i % 2 == 0) for i in range(depth))
    return total


# ---------------------------------------------------------------- building the parts on meta


class _Parts:
    """The pieces of one pair the counts and the forward need, whatever the family's attribute names."""

    def __init__(self, name: str):
        entry = preset(name)
        self.name, self.entry = name, entry
        self.vlm_config = vlm_config(name)
        self.text_config = self.vlm_config.get_text_config()
        self.width = self.text_config.hidden_size
        self.family = "gsva" if "gsva_preset" in entry else self.vlm_config.model_type
        self.mask_family = entry["mask_decoder"]["model_type"]
        self.backbone_note = None
        with torch.device("meta"):
            if self.family == "gsva":
                from modeling_gsva import GSVAForCausalLM

                self.vlm = GSVAForCausalLM(self.vlm_config).to(torch.bfloat16)
                self.sam = self.vlm.sam
                self.fcs = self.vlm.text_hidden_fcs
                self.vision_modules = [self.vlm.vision_tower, self.vlm.multi_modal_projector]
                self.decoder = self.vlm.language_model
            else:
                from modeling_gsva import build_text_hidden_fcs

                self.vlm = AutoModelForImageTextToText.from_config(self.vlm_config, dtype=torch.bfloat16)
                self.sam = self._mask_model(mask_config(name))
                self.fcs = build_text_hidden_fcs(self.width, HEAD_WIDTH).to(torch.bfloat16)
                self.decoder = self.vlm.get_decoder()
                self.vision_modules = [
                    module for key, module in self.vlm.model.named_children() if key not in ("language_model", "text_model")
                ]  # fmt: skip
        self.lm_head = self.vlm.lm_head
        self.tied = self.lm_head.weight is self.decoder.get_input_embeddings().weight

    def _mask_model(self, config) -> nn.Module:
        if self.mask_family != "edgetam" or is_timm_available():
            return AutoModel.from_config(config, dtype=torch.bfloat16)
        # EdgeTAM's backbone is a timm model (not installable here): build every other part, count RepViT-M1 apart.
        from transformers.models.edgetam import modeling_edgetam as edgetam

        model = nn.Module()
        model.vision_encoder = nn.Module()
        model.vision_encoder.neck = edgetam.EdgeTamVisionNeck(config.vision_config)
        model.prompt_encoder = edgetam.EdgeTamPromptEncoder(config.prompt_encoder_config)
        model.mask_decoder = edgetam.EdgeTamMaskDecoder(config.mask_decoder_config)
        model.shared_image_embedding = edgetam.EdgeTamPositionalEmbedding(config.prompt_encoder_config)
        model.no_memory_embedding = nn.Parameter(torch.zeros(1, 1, config.vision_config.fpn_hidden_size))
        model.config = config
        self.backbone_note = (
            f"RepViT-M1 backbone counted analytically ({repvit_m1_parameters() / 1e6:.2f} M, timm train form; "
            f"published {REPVIT_M1_PUBLISHED_M} M reparameterised): timm is not installed"
        )
        return model.to(torch.bfloat16)


def _numel(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def image_tokens(parts: _Parts) -> int:
    """Tokens one image at the preset's size takes in the LM (the processor's expansion rule, backbones.md A.3)."""
    side, vision = parts.entry["vlm_image_size"], parts.vlm_config.vision_config
    if parts.family in ("qwen2_5_vl", "qwen3_vl"):
        return (side // vision.patch_size) ** 2 // vision.spatial_merge_size**2
    if parts.family == "smolvlm":
        return _smolvlm_crops(parts) * (vision.image_size // vision.patch_size) ** 2 // parts.vlm_config.scale_factor**2
    return (side // vision.patch_size) ** 2  # GSVA: CLIP patches without the CLS token


def _smolvlm_crops(parts: _Parts) -> int:
    per_side = -(-parts.entry["vlm_image_size"] // parts.vlm_config.vision_config.image_size)
    return 1 if per_side == 1 else per_side**2 + 1


# ---------------------------------------------------------------- the forward pieces


def _vision_features(parts: _Parts) -> torch.Tensor:
    """Run the vision tower (+ projector) on one meta image; returns `(image_tokens, width)`."""
    side, vision = parts.entry["vlm_image_size"], parts.vlm_config.vision_config
    if parts.family == "gsva":
        return parts.vlm.get_image_features(torch.empty(1, 3, side, side, dtype=torch.bfloat16, device="meta"))[0]
    if parts.family in ("qwen2_5_vl", "qwen3_vl"):
        from transformers import vision_utils

        grid = torch.tensor([[1, side // vision.patch_size, side // vision.patch_size]])
        channels = 3 * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.empty(int(grid.prod()), channels, dtype=torch.bfloat16, device="meta")
        # Index bookkeeping that `.tolist()`s the grid is done here on the CPU (meta tensors hold no values).
        extra = {"position_ids": vision_utils.get_vision_position_ids(grid, vision.spatial_merge_size)}
        extra["position_ids"] = extra["position_ids"].to("meta")
        extra["cu_seqlens"], extra["max_seqlen"] = vision_utils.get_vision_attention_seqlens(grid, vision)
        if parts.family == "qwen2_5_vl":
            window_index, windows = vision_utils.get_vision_window_index(
                grid, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
                patch_size=vision.patch_size,
            )  # fmt: skip
            extra["window_index"], extra["cu_window_seqlens"] = window_index, torch.as_tensor(windows)
        else:
            tower = parts.vlm.model.visual
            indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
                align_corners=tower.interpolation_align_corners, spatial_merge_size=vision.spatial_merge_size,
            )  # fmt: skip
            extra["interp_indices"], extra["interp_weights"] = indices.to("meta"), weights.to("meta")
        out = parts.vlm.model.visual(pixels, grid_thw=grid, **extra)
        return out.pooler_output
    crops, size = _smolvlm_crops(parts), vision.image_size
    pixels = torch.empty(crops, 3, size, size, dtype=torch.bfloat16, device="meta")
    states = parts.vlm.model.vision_model(pixel_values=pixels).last_hidden_state
    return parts.vlm.model.connector(states).flatten(0, 1)


def _mask_encoder(parts: _Parts, run: bool) -> tuple[torch.Tensor, list]:
    """The image embedding `(1, C, 64, 64)` and SAM 2-style hi-res features, from a meta image or, when `run` is
    False (a frozen encoder, which saves nothing for backward), as empty tensors of the encoder's output shapes."""
    size = parts.entry["mask_image_size"]
    side = size // 16
    if parts.mask_family == "sam":
        if not run:
            return torch.empty(1, HEAD_WIDTH, side, side, dtype=torch.bfloat16, device="meta"), []
        pixels = torch.empty(1, 3, size, size, dtype=torch.bfloat16, device="meta")
        return parts.sam.vision_encoder(pixels).last_hidden_state, []
    if run:
        if parts.mask_family == "edgetam":
            raise RuntimeError("EdgeTAM's RepViT backbone needs timm, which is not installed here")
        pixels = torch.empty(1, 3, size, size, dtype=torch.bfloat16, device="meta")
        fpn = list(parts.sam.vision_encoder(pixels).fpn_hidden_states)
    else:
        fpn = [torch.empty(1, HEAD_WIDTH, side * s, side * s, dtype=torch.bfloat16, device="meta") for s in (4, 2, 1)]
    decoder = parts.sam.mask_decoder
    high_res = [decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])]
    return fpn[2] + parts.sam.no_memory_embedding.view(1, -1, 1, 1), high_res


def _decode_masks(parts: _Parts, prompts: torch.Tensor, embedding: torch.Tensor, high_res: list) -> torch.Tensor:
    sam = parts.sam
    side = embedding.shape[-1]
    positions = _image_positions(sam, side).to(embedding.dtype)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, side, side)
    kwargs = {"high_resolution_features": high_res} if high_res else {}
    out = sam.mask_decoder(
        image_embeddings=embedding, image_positional_embeddings=positions,
        sparse_prompt_embeddings=prompts[:, :, None, :], dense_prompt_embeddings=dense, multimask_output=False,
        **kwargs,
    )  # fmt: skip
    return out[0]


def _image_positions(sam: nn.Module, side: int) -> torch.Tensor:
    if hasattr(sam, "get_image_wide_positional_embeddings"):
        return sam.get_image_wide_positional_embeddings()
    grid = torch.ones((side, side), device="meta")
    y = (grid.cumsum(0) - 0.5) / side
    x = (grid.cumsum(1) - 0.5) / side
    return sam.shared_image_embedding(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)


def _training_forward(parts: _Parts, frozen: bool) -> torch.Tensor:
    """GSVA's training forward of the pair at batch 1; returns the loss."""
    from modeling_gsva import mask_bce_loss, mask_dice_loss

    n_image = image_tokens(parts)
    if frozen:
        features = torch.empty(n_image, parts.width, dtype=torch.bfloat16, device="meta")
    else:
        features = _vision_features(parts)
    total = PROMPT_TEXT_TOKENS + n_image + ANSWER_TOKENS
    ids = torch.zeros(1, total, dtype=torch.long, device="meta")
    embeds = parts.decoder.get_input_embeddings()(ids)
    start = PROMPT_TEXT_TOKENS // 2
    embeds = torch.cat([embeds[:, :start], features[None].to(embeds.dtype), embeds[:, start + n_image :]], 1)
    positions = torch.zeros(3 if parts.family.startswith("qwen") else 1, 1, total, dtype=torch.long, device="meta")
    if not parts.family.startswith("qwen"):
        positions = positions[0]
    hidden = parts.decoder(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    logits = parts.lm_head(hidden)
    loss = parts.vlm.loss_function(logits=logits, labels=ids, vocab_size=logits.shape[-1])
    seg_at = torch.arange(total - SEG_TOKENS - 1, total - 1, device="meta")
    prompts = parts.fcs[0](hidden[:, seg_at])
    embedding, high_res = _mask_encoder(parts, run=not frozen)
    masks = _decode_masks(parts, prompts.to(embedding.dtype), embedding, high_res)[:, :, 0]
    target = torch.zeros(masks.shape[1:], device="meta")
    return loss + mask_bce_loss(masks[0], target) + mask_dice_loss(masks[0], target)


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, each storage once, parameters excluded."""
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if not isinstance(base, nn.Parameter):
            seen[id(base)] = base
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(t.numel() * t.element_size() for t in seen.values())


def _set_trainable(parts: _Parts, frozen: bool) -> None:
    """Everything trainable, or GSVA's freezing: vision tower and projector, SAM image encoder and prompt encoder."""
    for module in (parts.vlm, parts.sam, parts.fcs):
        module.requires_grad_(True)
        module.train()
    if frozen:
        for module in parts.vision_modules + [parts.sam.vision_encoder, parts.sam.prompt_encoder]:
            module.requires_grad_(False)


def _activations(parts: _Parts, frozen: bool) -> tuple[int | None, str | None]:
    _set_trainable(parts, frozen)
    try:
        return saved_activation_bytes(lambda: _training_forward(parts, frozen)), None
    except Exception as error:  # a family whose forward cannot run on meta: no number rather than a made-up one
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


# ---------------------------------------------------------------- the report


def pair_counts(name: str, activations: bool = True) -> dict:
    """Parameters per part, totals, bf16 bytes, training activation bytes (frozen / all trainable) and the prompt's
    KV cache bytes for the pair `name`, all from models on the meta device."""
    parts = _Parts(name)
    width, tied = parts.width, parts.tied
    vlm_total = _numel([parts.vlm])
    language = _numel([parts.decoder]) + (0 if tied else parts.lm_head.weight.numel())
    fcs = _numel([parts.fcs])
    if parts.family == "gsva":
        # GSVA-7B's vocabulary already holds [SEG]/[REJ]: their rows move from the language model to the head.
        new_rows = NEW_TOKENS * width * (1 if tied else 2)
        vision = vlm_total - fcs - _numel([parts.sam]) - language
        language -= new_rows
        mask_total = _numel([parts.sam])
    else:
        new_rows = NEW_TOKENS * width * (1 if tied else 2)
        vision = vlm_total - language
        mask_total = _numel([parts.sam])
    backbone = repvit_m1_parameters() if parts.mask_family == "edgetam" else 0
    encoder = _numel([parts.sam.vision_encoder]) + backbone
    decoder = mask_total + backbone - encoder
    head = fcs + new_rows
    total = vision + language + encoder + decoder + head
    counts = {
        "name": name,
        "vlm_repo": parts.entry["vlm_repo"],
        "mask_decoder_repo": parts.entry["mask_decoder_repo"],
        "vlm_vision": vision,
        "vlm_language": language,
        "mask_image_encoder": encoder,
        "mask_decoder": decoder,
        "mask_decoder_only": _numel([parts.sam.mask_decoder]),
        "gsva_head": head,
        "total": total,
        "bf16_weight_bytes": 2 * total,
        "tied_embeddings": tied,
        "image_tokens": image_tokens(parts),
        "prompt_tokens": PROMPT_TEXT_TOKENS + image_tokens(parts),
        "kv_cache_bytes": kv_cache_bytes(parts.text_config, PROMPT_TEXT_TOKENS + image_tokens(parts)),
        "notes": [note for note in [parts.backbone_note] if note],
    }
    if activations:
        for key, frozen in (("activation_bytes_frozen", True), ("activation_bytes_trainable", False)):
            counts[key], reason = _activations(parts, frozen)
            if reason:
                counts["notes"].append(f"{key}: not measured ({reason})")
    return counts


def kv_cache_bytes(text_config, tokens: int, bytes_per_value: int = 2) -> int:
    """2 (K and V) x layers x KV heads x head dim x tokens x bytes per value."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * heads * head_dim * tokens * bytes_per_value
