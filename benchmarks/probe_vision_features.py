"""How fast can the tiny preset's CLIP tower learn what the synthetic images hold, given direct supervision?

GSVA starts from OpenAI's CLIP, whose patch features already tell colours and shapes apart; the tiny preset's tower
is random and learns only through the language model's loss. This isolates the vision side: the features the
language model reads (CLIP at `vision_feature_layer`, then the projector) are trained, through a throwaway linear
head on their max- and mean-pool, to say which colour+shape pairs each train image holds (`synthetic_labels.json`).
Every `--eval-every` steps it prints, on the val images, the share of present pairs called present (recall) and of
absent pairs called absent (specificity). `--save DIR` writes a GSVA folder with the trained tower, to start other
probes or training runs from a "pretrained" CLIP.

    python benchmarks/probe_vision_features.py --steps 3000 --feature-layer -1
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_gsva import GSVAConfig  # noqa: E402
from gsva_hf.data.synthetic import IMAGE_SUBDIR, read_image_contents  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor  # noqa: E402


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
    head = PresenceHead(model.config.text_config.hidden_size, len(train.pairs))
    params = [p for p, _ in flags]
    optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0)
    generator = torch.Generator().manual_seed(seed)

    def logits(images) -> torch.Tensor:
        pixels = image_processor(list(images), return_tensors="pt")["pixel_values"]
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
                logits(train.images[i] for i in index), train.targets[index]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step % eval_every == 0 or step == steps or step == 1:
                for part in parts:
                    part.eval()
                with torch.no_grad():
                    said = torch.cat([logits(val.images[i : i + 64]) > 0 for i in range(0, len(val), 64)])
                present = val.targets > 0
                rows.append({
                    "step": step, "seconds": round(time.perf_counter() - start, 1), "loss": loss.item(),
                    "val_recall": (said & present).sum().item() / max(int(present.sum()), 1),
                    "val_specificity": (~said & ~present).sum().item() / max(int((~present).sum()), 1),
                })  # fmt: skip
                if on_row:
                    on_row(rows[-1])
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for part, mode in modes:
            part.train(mode)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "gsva-tiny")
    parser.add_argument("--dataset_dir", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--feature-layer", type=int, default=None, help="vision_feature_layer (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write a GSVA folder with the trained tower here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    config = GSVAConfig.from_pretrained(args.preset)
    if args.feature_layer is not None:
        config.vision_feature_layer = args.feature_layer
    model = GSVAForCausalLM._from_config(config)
    processor = GSVAProcessor.from_pretrained(args.preset)
    train = ImageContentLabels(args.dataset_dir, "train")
    val = ImageContentLabels(args.dataset_dir, "val", train.pairs)
    print("| step | seconds | loss | val recall | val specificity |\n|---|---|---|---|---|")

    def print_row(row: dict) -> None:
        print(
            f"| {row['step']} | {row['seconds']} | {row['loss']:.3f} | {row['val_recall']:.3f} | "
            f"{row['val_specificity']:.3f} |",
            flush=True,
        )

    train_vision_features(
        model, processor.image_processor, train, val, args.steps, args.batch_size, args.lr, args.eval_every, args.seed,
        on_row=print_row,
    )  # fmt: skip
    if args.save:
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
