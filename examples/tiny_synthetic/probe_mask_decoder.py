"""How fast a GSVA folder's mask decoder learns the synthetic task's masks when its prompts are ideal, and the same
training as a build stage (`pretrain_mask_path`).

In place of the language model's `[SEG]` state, every target gets a learned embedding of what it names: its colour
and shape, its colour alone, its shape alone, or any of the three (`--prompt`). The embeddings go through the model's
own `text_hidden_fcs` and `masks_from_hidden_states` and train with its BCE + Dice (`mask_losses`); the mask decoder
(image encoder included) starts from random weights and trains on the train split. Val cIoU and mean IoU are
printed at fixed seconds of training, so mask decoders (SAM, SAM 2, ...) compare apart from the language model that
prompts them in GSVA.

    python examples/tiny_synthetic/probe_mask_decoder.py --model outputs/qwen-sam2-tiny --seconds 240

`pretrain_mask_path` is the tiny model's stand-in for a pretrained SAM: it trains a composed model's mask path in
place (its prompt table is thrown away after), so the language model's `[SEG]` states prompt a decoder that already
segments.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configuration_gsva import GSVAConfig  # noqa: E402
from examples.tiny_synthetic.diagnose_synthetic import overlap, overlap_scores  # noqa: E402
from examples.tiny_synthetic.vision_pretraining import _SplitImages  # noqa: E402
from gsva_hf.data.synthetic import decode_rle  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor, mask_input_size  # noqa: E402

logger = logging.getLogger(__name__)

PROMPTS = {
    "both": lambda o: (o["color"], o["shape"]),
    "colour": lambda o: (o["color"], None),
    "shape": lambda o: (None, o["shape"]),
}
MIXED = "mixed"  # every target of the three kinds above: what GSVA's expressions name


def named_targets(objects: list[dict], height: int, width: int, prompt: str) -> dict[tuple, np.ndarray]:
    """Every target an image offers under `prompt`: what it names -> the union of the masks of the objects it names."""
    name = PROMPTS[prompt]
    targets: dict[tuple, np.ndarray] = {}
    for found in objects:
        rle = mask_utils.merge(mask_utils.frPyObjects(found["segmentation"], height, width))
        mask = decode_rle(rle).astype(bool)
        key = name(found)
        targets[key] = targets[key] | mask if key in targets else mask
    return targets


def overlaps(logits: list[torch.Tensor], truths: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(intersection, union) in pixels of each target's mask (logits > 0) with its ground truth."""
    return [overlap(mask, target > 0.5) for predicted, truth in zip(logits, truths) for mask, target in zip(predicted > 0, truth)]


class MaskDecoderProbe:
    """A model's mask path fed by a table of learned prompts, one per name the task can give under `prompt`."""

    def __init__(self, model, processor, prompt: str, seed: int = 0):
        if prompt not in PROMPTS and prompt != MIXED:
            raise ValueError(f"prompt must be one of {sorted([*PROMPTS, MIXED])}, got {prompt!r}")
        torch.manual_seed(seed)
        self.model, self.processor = model, processor
        self.model.train()
        self.prompt = prompt
        self.width = self.model.text_hidden_fcs[0][0].in_features
        self.names: dict[tuple, int] = {}
        self.table = torch.nn.Embedding(64, self.width)
        torch.nn.init.normal_(self.table.weight)

    @classmethod
    def from_folder(cls, model_dir, prompt: str, keep_weights: bool = False, seed: int = 0) -> "MaskDecoderProbe":
        """The folder's model with its weights (`keep_weights`) or drawn anew from its config."""
        torch.manual_seed(seed)
        if keep_weights:
            model = GSVAForCausalLM.from_pretrained(model_dir)
        else:
            model = GSVAForCausalLM._from_config(GSVAConfig.from_pretrained(model_dir))
        return cls(model, GSVAProcessor.from_pretrained(model_dir), prompt, seed)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the probe trains besides its table: the mask decoder (image encoder included) and `text_hidden_fcs`."""
        return [*self.model.model.sam.parameters(), *self.model.text_hidden_fcs.parameters()]

    def optimizer(self, learning_rate: float, prompt_learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [{"params": self.parameters(), "lr": learning_rate}, {"params": self.table.parameters(), "lr": prompt_learning_rate}],
            weight_decay=0.0,
        )

    def step(self, optimizer, rng, images: list[np.ndarray], targets: list[dict], batch_size: int, per_image: int) -> float:
        """One training step on `batch_size` random train images, each with up to `per_image` of its targets."""
        rows = rng.integers(len(images), size=batch_size)
        chosen = []
        for row in rows:
            keys = list(targets[row])
            picked = rng.permutation(len(keys))[:per_image]
            chosen.append({keys[k]: targets[row][keys[k]] for k in picked})
        loss = self.loss(*self.batch([images[row] for row in rows], chosen))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    def index(self, key: tuple) -> int:
        if key not in self.names:
            if len(self.names) == self.table.num_embeddings:
                raise ValueError(f"more than {self.table.num_embeddings} names under --prompt {self.prompt}")
            self.names[key] = len(self.names)
        return self.names[key]

    def batch(self, images: list[np.ndarray], targets: list[dict[tuple, np.ndarray]]) -> tuple:
        sam = self.processor.sam_image_processor([Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
        slots = max(len(t) for t in targets)
        slot_mask = torch.zeros(len(targets), slots, dtype=torch.bool)
        ids = torch.zeros(len(targets), slots, dtype=torch.long)
        for row, found in enumerate(targets):
            slot_mask[row, : len(found)] = True
            ids[row, : len(found)] = torch.tensor([self.index(key) for key in found])
        truths = [torch.tensor(np.stack(list(found.values())), dtype=torch.float32) for found in targets]
        return sam, ids, slot_mask, truths

    def masks(self, sam, ids, slot_mask) -> torch.Tensor:
        embeddings = self.model.model.get_sam_image_embeddings(sam)
        return self.model.model.masks_from_hidden_states(self.table(ids), embeddings, slot_mask)[0]

    def loss(self, sam, ids, slot_mask, truths) -> torch.Tensor:
        bce, dice = self.model.mask_losses(self.masks(sam, ids, slot_mask), slot_mask, slot_mask, truths)
        return bce + dice

    @torch.no_grad()
    def scores(self, batches: list[tuple]) -> dict:
        """Val cIoU (summed intersections over summed unions) and mean IoU, masks brought to the images' size as
        the processor does."""
        self.model.eval()
        pairs, (side, square) = [], self.processor.mask_input()
        for sam, ids, slot_mask, truths in batches:
            sizes = [tuple(t.shape[1:]) for t in truths]
            resized = [mask_input_size(size, side, square) for size in sizes]
            logits = self.processor.post_process_masks(self.masks(sam, ids, slot_mask), sizes, resized, slot_mask)
            pairs += overlaps(logits, truths)
        self.model.train()
        return overlap_scores(pairs)


def split_targets(split: _SplitImages, prompt: str) -> list[dict[tuple, np.ndarray]]:
    kinds = sorted(PROMPTS) if prompt == MIXED else [prompt]
    return [
        {key: mask for kind in kinds for key, mask in named_targets(found, *image.shape[:2], kind).items()}
        for image, found in zip(split.images, split.objects)
    ]


def val_batches(probe: MaskDecoderProbe, val: _SplitImages, targets: list[dict], count: int, batch_size: int) -> list[tuple]:
    return [
        probe.batch(val.images[start : min(start + batch_size, count)], targets[start : min(start + batch_size, count)])
        for start in range(0, count, batch_size)
    ]


def pretrain_mask_path(
    model, processor, dataset_dir, steps: int, batch_size: int = 16, targets_per_image: int = 3,
    learning_rate: float = 3e-4, prompt_learning_rate: float = 1e-3, seed: int = 0, val_images: int = 96, log_every: int = 0,
) -> dict:  # fmt: skip
    """Train `model`'s mask path (mask decoder, image encoder included, and `text_hidden_fcs`) in place for `steps`
    steps from learned prompts naming any of the task's targets; report the val split's scores for colour-and-shape
    prompts, the first and last loss, and the wall seconds (learning curves count them)."""
    if steps <= 0:
        raise ValueError(f"mask pretraining needs a positive number of steps, got {steps}")
    start = time.perf_counter()
    was_training = model.training
    probe = MaskDecoderProbe(model, processor, MIXED, seed)
    train, val = _SplitImages(dataset_dir, "train"), _SplitImages(dataset_dir, "val")
    train_targets = split_targets(train, MIXED)
    optimizer = probe.optimizer(learning_rate, prompt_learning_rate)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(1, steps + 1):
        losses.append(probe.step(optimizer, rng, train.images, train_targets, batch_size, targets_per_image))
        if log_every and step % log_every == 0:
            logger.info("mask pretraining: step %d loss %.4f", step, losses[-1])
    scores = probe.scores(val_batches(probe, val, split_targets(val, "both"), min(val_images, len(val)), batch_size))
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    return {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "first_loss": losses[0],
        "last_loss": losses[-1], "val_ciou": scores["ciou"], "val_miou": scores["miou"],
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GSVA folder: its config, processor and mask path are used")
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--prompt", choices=sorted([*PROMPTS, MIXED]), default="both", help="what a target's prompt names")
    parser.add_argument("--seconds", type=float, default=240.0, help="training seconds (evaluations not counted)")
    parser.add_argument("--eval_every", type=float, default=60.0, help="seconds of training between evaluations")
    parser.add_argument("--batch_size", type=int, default=16, help="images per step")
    parser.add_argument("--targets_per_image", type=int, default=3, help="at most this many targets of an image per step")
    parser.add_argument("--val_images", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="mask decoder and text_hidden_fcs")
    parser.add_argument("--prompt_learning_rate", type=float, default=1e-3, help="the prompt table")
    parser.add_argument("--keep_weights", action="store_true", help="start from the folder's weights, not random ones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.eval_every <= 0:
        parser.error(f"--seconds and --eval_every must be > 0, got {args.seconds} and {args.eval_every}")
    for flag in ("batch_size", "targets_per_image", "val_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    probe = MaskDecoderProbe.from_folder(args.model, args.prompt, args.keep_weights, args.seed)
    train, val = _SplitImages(args.dataset_dir, "train"), _SplitImages(args.dataset_dir, "val")
    train_targets, val_targets = split_targets(train, args.prompt), split_targets(val, args.prompt)
    count = min(args.val_images, len(val))
    batches = val_batches(probe, val, val_targets, count, args.batch_size)
    optimizer = probe.optimizer(args.learning_rate, args.prompt_learning_rate)
    print(f"mask decoder: {probe.model.config.sam_config.model_type}, prompts name {args.prompt}; {len(train)} train images, {count} val")
    print("| seconds | step | loss | val cIoU | val mean IoU |\n|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    spent, step, next_eval = 0.0, 0, args.eval_every
    while spent < args.seconds:
        started = time.perf_counter()
        loss = probe.step(optimizer, rng, train.images, train_targets, args.batch_size, args.targets_per_image)
        spent += time.perf_counter() - started
        step += 1
        if spent >= next_eval or spent >= args.seconds:
            scores = probe.scores(batches)
            print(f"| {spent:.0f} | {step} | {loss:.3f} | {scores['ciou']:.4f} | {scores['miou']:.4f} |", flush=True)
            while next_eval <= spent:
                next_eval += args.eval_every


if __name__ == "__main__":
    main()
