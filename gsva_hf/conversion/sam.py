"""SAM from the segment-anything release: its keys renamed to transformers' `SamModel`, its configuration
read off the tensor shapes, and a SAM source (`.pth` or SamModel folder) as GSVA `sam.*` items.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .common import ConversionError, TensorStore, _expected_shapes, _Item, _read_item, _refuse_problems, _shape

SAM_VARIANTS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
_SAM_RENAMES = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^vision_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^vision_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^vision_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^vision_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^vision_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_SAM_MLP = re.compile(r"^mask_decoder\.(?P<mlp>output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
SAM_POSITIONAL_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
HF_SAM_POSITIONAL_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")


def sam_rename_plan(keys: Iterable[str]) -> dict[str, list[str]]:
    """segment-anything `Sam` keys → transformers `SamModel` keys (a list: the positional matrix is shared).

    An empty list means the tensor is a derived buffer (`pixel_mean/std`). Keys that follow no known pattern
    keep their (renamed) name; the caller's strict check then reports them.
    """
    keys = list(keys)
    depths: dict[str, int] = {}
    for key in keys:
        match = _SAM_MLP.match(key)
        if match:
            depths[match["mlp"]] = max(depths.get(match["mlp"], 0), int(match["i"]) + 1)
    plan = {}
    for key in keys:
        if key in ("pixel_mean", "pixel_std"):
            plan[key] = []
            continue
        if key == SAM_POSITIONAL_KEY:
            plan[key] = list(HF_SAM_POSITIONAL_KEYS)
            continue
        match = _SAM_MLP.match(key)
        if match:
            index, last = int(match["i"]), depths[match["mlp"]] - 1
            layer = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            plan[key] = [f"mask_decoder.{match['mlp']}.{layer}.{match['rest']}"]
            continue
        renamed = key
        for pattern, replacement in _SAM_RENAMES:
            renamed = re.sub(pattern, replacement, renamed)
        plan[key] = [renamed]
    return plan


def convert_sam_state_dict(
    state_dict: Mapping[str, torch.Tensor], target: nn.Module | Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Official segment-anything state dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) →
    transformers `SamModel` state dict, strictly checked against `target` (a `SamModel`, possibly on the meta
    device, or a key → shape mapping).

    Raises `ConversionError` listing source keys that map to nothing, model keys left missing and shape
    mismatches, so a partly loaded SAM can never pass silently.
    """
    expected = _expected_shapes(target)
    plan = sam_rename_plan(state_dict)
    converted, unmapped, mismatched = {}, [], []
    for key, targets in plan.items():
        for name in targets:
            if name not in expected:
                unmapped.append(f"{key} (would be {name})")
            elif tuple(state_dict[key].shape) != expected[name]:
                mismatched.append(f"{key} -> {name}: checkpoint {_shape(state_dict[key].shape)}, model expects {_shape(expected[name])}")
            else:
                converted[name] = state_dict[key]
    produced = {name for targets in plan.values() for name in targets}
    missing = [f"{k} {_shape(v)}" for k, v in expected.items() if k not in produced]
    _refuse_problems("SAM state dict does not fit the model", [
        (unmapped, "checkpoint tensors map to no SamModel key"),
        (missing, "SamModel tensors are missing from the checkpoint"),
        (mismatched, "shape mismatches"),
    ])  # fmt: skip
    return converted


def sam_config_from_shapes(shapes: Mapping[str, Sequence[int]], decoder_heads: int = 8):
    """transformers `SamConfig` matching a segment-anything checkpoint, read off its tensor shapes.

    Head counts are not stored in tensors: the vision heads come from the relative-position tables (their width
    is the head size), the decoder's from `decoder_heads` (8 in every official SAM). The decoder's LayerNorm eps
    is segment-anything's 1e-5; transformers' default 1e-6 shifts mask logits by ~1e-4.
    """
    from transformers import SamConfig

    def need(*keys):
        for key in keys:
            if key in shapes:
                return tuple(shapes[key])
        raise ConversionError(f"cannot infer the SAM configuration: tensor {' or '.join(map(repr, keys))} is missing")

    patch_weight = need("image_encoder.patch_embed.proj.weight")
    hidden, patch = patch_weight[0], patch_weight[2]
    depth = len({k.split(".")[2] for k in shapes if k.startswith("image_encoder.blocks.")})
    pos_embed = shapes.get("image_encoder.pos_embed")
    grid = None if pos_embed is None else pos_embed[1]
    if "image_encoder.blocks.0.attn.rel_pos_h" not in shapes:
        raise ConversionError(
            "cannot infer the SAM attention layout from a checkpoint without relative-position tables "
            "(image_encoder.blocks.*.attn.rel_pos_h); convert it from a transformers SamModel folder instead"
        )
    head_dim = need("image_encoder.blocks.0.attn.rel_pos_h")[1]
    sizes = [(need(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
    if grid is None:
        grid = max(sizes)
    global_layers = [i for i, size in enumerate(sizes) if size == grid]
    windows = {size for size in sizes if size != grid}
    if len(windows) > 1:
        raise ConversionError(f"SAM blocks use several window sizes {sorted(windows)}; transformers' SamModel supports one")
    vision = dict(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch,
        patch_size=patch,
        output_channels=need("image_encoder.neck.0.weight")[0],
        mlp_dim=need("image_encoder.blocks.0.mlp.lin1.weight")[0],
        mlp_ratio=need("image_encoder.blocks.0.mlp.lin1.weight")[0] / hidden,
        window_size=windows.pop() if windows else 0,
        global_attn_indexes=global_layers,
        use_rel_pos=True,
        use_abs_pos=pos_embed is not None,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in shapes,
        num_pos_feats=need(SAM_POSITIONAL_KEY)[1],
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    prompt_hidden = need("prompt_encoder.no_mask_embed.weight")[1]
    for key in ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"):
        shape = shapes.get(key)
        if shape is not None and (len(shape) != 2 or shape[1] != prompt_hidden):
            rows = shape[0] if len(shape) == 2 else "n"
            raise ConversionError(
                f"SAM tensor {key} has shape {_shape(shape)}, expected [{rows}, {prompt_hidden}] (the width of "
                "prompt_encoder.no_mask_embed.weight: SAM's prompt encoder and mask decoder share it)"
            )
    prompt = dict(
        hidden_size=prompt_hidden,
        image_size=grid * patch,
        patch_size=patch,
        mask_input_channels=need("prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=len({k.split(".")[2] for k in shapes if k.startswith("prompt_encoder.point_embeddings.")}),
    )
    decoder_layers = len({k.split(".")[3] for k in shapes if k.startswith("mask_decoder.transformer.layers.")})
    decoder = dict(
        hidden_size=need("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight")[1],
        mlp_dim=need("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_hidden_layers=decoder_layers,
        num_attention_heads=decoder_heads,
        attention_downsample_rate=prompt_hidden // need("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0],
        num_multimask_outputs=need("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=len({k.split(".")[3] for k in shapes if k.startswith("mask_decoder.iou_prediction_head.layers.")}),
        iou_head_hidden_dim=need("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        layer_norm_eps=1e-5,  # segment-anything's two-way transformer: nn.LayerNorm default (transformers: 1e-6)
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def _sam_store_and_config(sam: str | Path, decoder_heads: int) -> tuple[dict[str, _Item], object, str]:
    """SAM from an official `.pth` (renamed) or a transformers SamModel folder → `sam.*` items and config."""
    from transformers import SamConfig

    path = Path(sam)
    if path.is_dir():
        config = SamConfig.from_pretrained(str(path))
        store = TensorStore.open(path)
        items = {"sam." + re.sub(r"^sam\.", "", k): _read_item(store, k) for k in store.keys()}
        first, second = ("sam." + k for k in HF_SAM_POSITIONAL_KEYS)
        if first in items and second not in items:
            items[second] = items[first]
        return items, config, f"SamModel folder {path}"
    store = TensorStore.open(path)
    shapes = {k: store.shape(k) for k in store.keys()}
    try:
        config = sam_config_from_shapes(shapes, decoder_heads)
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from error
    items = {}
    for key, targets in sam_rename_plan(store.keys()).items():
        for name in targets:
            items["sam." + name] = _read_item(store, key)
    return items, config, f"segment-anything checkpoint {path}"


def _check_sam_variant(sam: str | None, inferred, decoder_heads: int) -> None:
    if not sam:
        return
    vision = inferred.vision_config
    if sam in SAM_VARIANTS:
        want = SAM_VARIANTS[sam]
        source = f"--sam {sam}"
    else:
        other = _sam_store_and_config(sam, decoder_heads)[1].vision_config
        want = (other.hidden_size, other.num_hidden_layers)
        source = f"--sam {sam}"
    if (vision.hidden_size, vision.num_hidden_layers) != want:
        raise ConversionError(
            f"the release's SAM image encoder has width {vision.hidden_size} and {vision.num_hidden_layers} blocks, "
            f"but {source} has width {want[0]} and {want[1]} blocks"
        )
