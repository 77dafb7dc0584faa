"""The best IoU a GSVA folder's mask decoder could reach on the synthetic task's objects, whatever it learns.

SAM's mask decoders predict logits at 4x their image embedding's side, which GSVA's post-processing brings to the
image bilinearly (`GSVAProcessor.post_process_masks`). At 128 px that is 64 x 64 for SAM with 8-px patches and
32 x 32 for SAM 2 with its Hiera at stride 4 (16 px per embedding cell). For every object of a split this fits the
low-resolution logits that, upsampled by the folder's own rule, best match the object's mask (BCE, Adam), and
reports the IoU they reach: a ceiling of the decoder's masks that no training can pass. The model's weights are
not read, only its config and processor.

    python examples/tiny_synthetic/mask_resolution_ceiling.py --model gsva_hf/assets/gsva-tiny-synthetic
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configuration_gsva import GSVAConfig  # noqa: E402
from examples.tiny_synthetic.diagnose_synthetic import overlap, overlap_scores  # noqa: E402
from examples.tiny_synthetic.probe_mask_decoder import named_targets  # noqa: E402
from examples.tiny_synthetic.vision_pretraining import _SplitImages  # noqa: E402
from processing_gsva import GSVAProcessor, mask_input_size, upscale_mask_logits  # noqa: E402


def low_resolution_side(config: GSVAConfig) -> int:
    """The side of the mask decoder's logits: 4x its image embedding's (the prompt encoder's image size over its
    patch size, for SAM and SAM 2 alike)."""
    prompt = config.sam_config.prompt_encoder_config
    return 4 * (prompt.image_size // prompt.patch_size)


def fit_logits(masks: torch.Tensor, low: int, side: int, square: bool, steps: int = 300) -> torch.Tensor:
    """The `[n, low, low]` logits whose upsampling (`upscale_mask_logits` for a `side` input, `square` or SAM's
    padded rule) best fits the boolean masks `[n, H, W]` of one image size under BCE."""
    size = tuple(masks.shape[1:])
    resized = mask_input_size(size, side, square)
    target = masks.float()
    # Start from each low-resolution cell's share of the object, on the decoder's input (SAM's padded on the
    # bottom and right).
    if square:
        share = F.interpolate(target[:, None], (low, low), mode="area")
    else:
        on_input = F.pad(F.interpolate(target[:, None], resized, mode="area"), (0, side - resized[1], 0, side - resized[0]))
        share = F.interpolate(on_input, (low, low), mode="area")
    logits = torch.logit(share[:, 0].clamp(0.02, 0.98)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.3)
    for _ in range(steps):
        optimizer.zero_grad()
        upscaled = upscale_mask_logits(logits, resized, size, side, square)
        F.binary_cross_entropy_with_logits(upscaled, target).backward()
        optimizer.step()
    return logits.detach()


def resolution_ceiling(model_dir, dataset_dir, split: str = "val", steps: int = 300) -> dict:
    """cIoU and mean IoU of the best-fitting logits over every object of `split`, with the decoder's sides."""
    config = GSVAConfig.from_pretrained(model_dir)
    side, square = GSVAProcessor.from_pretrained(model_dir).mask_input()
    low = low_resolution_side(config)
    images = _SplitImages(dataset_dir, split)
    by_size = defaultdict(list)
    for image, found in zip(images.images, images.objects):
        for mask in named_targets(found, *image.shape[:2], "both").values():
            by_size[mask.shape].append(torch.from_numpy(mask))
    pairs = []
    for masks in by_size.values():
        stacked = torch.stack(masks)
        resized = mask_input_size(tuple(stacked.shape[1:]), side, square)
        upscaled = upscale_mask_logits(fit_logits(stacked, low, side, square, steps), resized, tuple(stacked.shape[1:]), side, square)
        pairs += [overlap(predicted > 0, truth) for predicted, truth in zip(upscaled, stacked)]
    return {"model": str(model_dir), "split": split, "input_side": side, "square_input": square, "logits_side": low,
            **overlap_scores(pairs)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GSVA folder: its mask decoder's config and processor")
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the fit")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    torch.manual_seed(0)
    print(json.dumps(resolution_ceiling(args.model, args.dataset_dir, args.split, args.steps), indent=2))


if __name__ == "__main__":
    main()
