"""Stage 0 for from-scratch models on the synthetic task: give the CLIP tower what a pretrained CLIP brings.

GSVA starts from OpenAI's CLIP, whose patch features already tell colours and shapes apart; its language model only
learns to look them up. A tiny tower trained from scratch only through the language model's loss learns shapes far
too slowly (BENCHMARKS.md, section 1). This stage is the tiny model's stand-in for CLIP's pretraining: the features
the language model reads (CLIP at `vision_feature_layer`, then the projector) learn, through a throwaway linear head
on their max- and mean-pool, which colour+shape pairs each train image holds (`synthetic_labels.json`).
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from gsva_hf.data.synthetic import IMAGE_SUBDIR, read_image_contents

logger = logging.getLogger(__name__)


class ImageContentLabels:
    """The images of one split as uint8 arrays and a 0/1 target per (colour, shape) pair, in `pairs` order."""

    def __init__(self, dataset_dir, split: str, pairs: list[tuple[str, str]] | None = None):
        records, contents = read_image_contents(dataset_dir, split)
        if not records:
            raise ValueError(f"{dataset_dir}: the synthetic task has no {split!r} images")
        self.pairs = pairs or sorted({pair for record in records for pair in contents[record["id"]]})
        root = Path(dataset_dir) / IMAGE_SUBDIR
        self.images = []
        for record in records:
            with Image.open(root / record["file_name"]) as image:
                self.images.append(np.asarray(image.convert("RGB")))
        self.targets = torch.tensor(
            [[pair in contents[record["id"]] for pair in self.pairs] for record in records], dtype=torch.float32
        )

    def __len__(self) -> int:
        return len(self.images)


class PresenceHead(nn.Module):
    def __init__(self, width: int, num_pairs: int):
        super().__init__()
        self.linear = nn.Linear(2 * width, num_pairs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([features.amax(1), features.mean(1)], dim=-1))


def train_vision_features(
    model, image_processor, train: ImageContentLabels, val: ImageContentLabels, steps: int, batch_size: int = 32,
    learning_rate: float = 1e-3, eval_every: int = 500, seed: int = 0, on_row=None,
) -> list[dict]:  # fmt: skip
    """Train `model.vision_tower` and `model.multi_modal_projector` in place; return one row per evaluation (each
    also handed to `on_row` as it comes). Every other parameter and every `requires_grad` flag is left as it was.
    """
    parts = [model.vision_tower, model.multi_modal_projector]
    flags = [(p, p.requires_grad) for part in parts for p in part.parameters()]
    modes = [(part, part.training) for part in parts]
    reference = next(model.vision_tower.parameters())
    head = PresenceHead(model.config.text_config.hidden_size, len(train.pairs)).to(reference.device)
    params = [p for p, _ in flags]
    optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0)
    generator = torch.Generator().manual_seed(seed)

    def logits(images) -> torch.Tensor:
        pixels = image_processor(list(images), return_tensors="pt")["pixel_values"].to(reference.device, reference.dtype)
        return head(model.get_image_features(pixels).float())

    rows, start = [], time.perf_counter()
    try:
        for parameter in params:
            parameter.requires_grad_(True)
        for step in range(1, steps + 1):
            for part in parts:
                part.train()
            index = torch.randint(len(train), (batch_size,), generator=generator).tolist()
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits(train.images[i] for i in index), train.targets[index].to(reference.device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step % eval_every == 0 or step == steps or step == 1:
                for part in parts:
                    part.eval()
                with torch.no_grad():
                    said = torch.cat([logits(val.images[i : i + 64]).cpu() > 0 for i in range(0, len(val), 64)])
                present = val.targets > 0
                rows.append({
                    "step": step, "seconds": round(time.perf_counter() - start, 1), "loss": loss.item(),
                    "val_recall": (said & present).sum().item() / max(int(present.sum()), 1),
                    "val_specificity": (~said & ~present).sum().item() / max(int((~present).sum()), 1),
                })  # fmt: skip
                if on_row:
                    on_row(rows[-1])
    finally:
        optimizer.zero_grad(set_to_none=True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for part, mode in modes:
            part.train(mode)
    return rows


def pretrain_vision(
    model, image_processor, dataset_dir, steps: int, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0
) -> dict:
    """Train the tower and projector on the train split's image contents; report the val split's recall and
    specificity at the end, the first and last loss, and the wall seconds spent (learning curves count them)."""
    if steps <= 0:
        raise ValueError(f"vision pretraining needs a positive number of steps, got {steps}")
    start = time.perf_counter()
    train = ImageContentLabels(dataset_dir, "train")
    val = ImageContentLabels(dataset_dir, "val", train.pairs)
    rows = train_vision_features(
        model, image_processor, train, val, steps, batch_size, learning_rate, eval_every=steps, seed=seed,
        on_row=lambda row: logger.info("vision pretraining: %s", row),
    )  # fmt: skip
    return {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"], "val_recall": rows[-1]["val_recall"],
        "val_specificity": rows[-1]["val_specificity"], "seconds": time.perf_counter() - start,
    }  # fmt: skip


__all__ = ["ImageContentLabels", "pretrain_vision", "train_vision_features"]
