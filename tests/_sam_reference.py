"""The `segment-anything` package's own SAM, small and random, as the reference for the SAM conversion tests.

`segment_anything/__init__.py` imports its predictor, which needs torchvision (not installable here); the
model code in `segment_anything.modeling` needs only torch. `segment_anything_modeling()` imports that
subpackage under a stub parent package and restores `sys.modules` afterwards.
"""

import contextlib
import importlib
import importlib.util
import math
import sys
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

# Small shapes that still exercise every code path: windowed blocks with padding (grid 8, window 3), a global
# block, relative positions, a 2-layer two-way transformer and the 3-layer IoU head.
IMAGE_SIZE = 64
PATCH = 8
GRID = IMAGE_SIZE // PATCH
VISION_WIDTH = 32
VISION_HEADS = 2
VISION_DEPTH = 3
WINDOW = 3
GLOBAL_BLOCKS = (1,)
PROMPT_WIDTH = 16
MASK_IN_CHANS = 4
DECODER_MLP = 32
DECODER_HEADS = 2


def _is_segment_anything(name: str) -> bool:
    return name == "segment_anything" or name.startswith("segment_anything.")


@contextlib.contextmanager
def segment_anything_modeling():
    """Yield `segment_anything.modeling` without executing `segment_anything/__init__.py`.

    Build models inside the `with` block; they keep working after it, when `sys.modules` is restored.
    """
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything is not installed")
    saved = {name: module for name, module in sys.modules.items() if _is_segment_anything(name)}
    for name in saved:
        del sys.modules[name]
    stub = types.ModuleType("segment_anything")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__spec__ = spec
    sys.modules["segment_anything"] = stub
    try:
        yield importlib.import_module("segment_anything.modeling")
    finally:
        for name in [n for n in sys.modules if _is_segment_anything(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def build_sam(modeling, seed: int = 0):
    """A small segment-anything `Sam` with every tensor random (SAM's own init leaves zeros in places)."""
    encoder = modeling.ImageEncoderViT(
        img_size=IMAGE_SIZE,
        patch_size=PATCH,
        embed_dim=VISION_WIDTH,
        depth=VISION_DEPTH,
        num_heads=VISION_HEADS,
        mlp_ratio=4.0,
        out_chans=PROMPT_WIDTH,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=WINDOW,
        global_attn_indexes=GLOBAL_BLOCKS,
    )
    prompt = modeling.PromptEncoder(
        embed_dim=PROMPT_WIDTH,
        image_embedding_size=(GRID, GRID),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=MASK_IN_CHANS,
    )
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(
            depth=2, embedding_dim=PROMPT_WIDTH, mlp_dim=DECODER_MLP, num_heads=DECODER_HEADS
        ),
        transformer_dim=PROMPT_WIDTH,
        iou_head_depth=3,
        iou_head_hidden_dim=PROMPT_WIDTH,
    )
    sam = modeling.Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sam.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("pos_embed"):
                tensor.copy_(0.1 * noise)
            elif tensor.dim() == 1 and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.dim() == 1:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise / math.sqrt(math.prod(tensor.shape[1:])))
    return sam.eval()


def hf_sam_config() -> dict:
    """transformers `SamConfig` kwargs describing `build_sam`'s model."""
    return {
        "vision_config": dict(
            hidden_size=VISION_WIDTH,
            num_hidden_layers=VISION_DEPTH,
            num_attention_heads=VISION_HEADS,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            output_channels=PROMPT_WIDTH,
            mlp_dim=4 * VISION_WIDTH,
            window_size=WINDOW,
            global_attn_indexes=list(GLOBAL_BLOCKS),
            use_rel_pos=True,
            num_pos_feats=PROMPT_WIDTH // 2,
            layer_norm_eps=1e-6,
            initializer_range=0.02,
        ),
        "prompt_encoder_config": dict(
            hidden_size=PROMPT_WIDTH, image_size=IMAGE_SIZE, patch_size=PATCH, mask_input_channels=MASK_IN_CHANS
        ),
        # segment-anything's two-way transformer uses nn.LayerNorm's default eps (1e-5), transformers' default is 1e-6.
        "mask_decoder_config": dict(
            hidden_size=PROMPT_WIDTH,
            mlp_dim=DECODER_MLP,
            num_attention_heads=DECODER_HEADS,
            iou_head_hidden_dim=PROMPT_WIDTH,
            layer_norm_eps=1e-5,
        ),
    }


@torch.no_grad()
def reference_masks(sam, image: torch.Tensor, prompts: torch.Tensor, resized_size, original_size):
    """GSVA's original SAM decoding with segment-anything's modules: each prompt is the only sparse token,
    dense = `no_mask_embed`, one mask per prompt, post-processed to the original size.

    Returns (image embedding, low-res logits [n, h, w], IoU [n], full-size logits [n, H, W]).
    """
    embedding = sam.image_encoder(image)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    count = prompts.shape[0]
    sparse = torch.cat([sparse.expand(count, -1, -1), prompts[:, None, :].to(sparse.dtype)], dim=1)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense.expand(count, -1, -1, -1),
        multimask_output=False,
    )
    full = sam.postprocess_masks(low_res, input_size=tuple(resized_size), original_size=tuple(original_size))
    return embedding, low_res[:, 0], iou[:, 0], full[:, 0]


def identity_text_hidden_fcs(model) -> None:
    """Make `text_hidden_fcs` pass the first `out_dim` features through unchanged (needs width >= 2*out_dim):
    Linear [I; -I] → ReLU → Linear [I, -I] gives relu(x) - relu(-x) = x exactly."""
    first, second = model.text_hidden_fcs[0][0], model.text_hidden_fcs[0][2]
    out_dim, width = second.weight.shape
    eye = torch.eye(out_dim)
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
        first.weight[:out_dim, :out_dim] = eye
        first.weight[out_dim : 2 * out_dim, :out_dim] = -eye
        second.weight.zero_()
        second.bias.zero_()
        second.weight[:, :out_dim] = eye
        second.weight[:, out_dim : 2 * out_dim] = -eye


def lift_prompts(prompts: torch.Tensor, width: int) -> torch.Tensor:
    """Hidden states whose first features are the prompts (input of `identity_text_hidden_fcs`)."""
    return F.pad(prompts, (0, width - prompts.shape[1]))
