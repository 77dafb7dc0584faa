"""How fast can the tiny preset's CLIP tower learn what the synthetic images hold, given direct supervision?

The vision side alone, as `train_hf.py --vision_pretrain_steps` trains it (`gsva_hf/vision_pretraining.py`): CLIP
and the projector learn, through a linear head on their pooled features, which colour+shape pairs each image holds.
Every `--eval-every` steps it prints, on the val images, the share of present pairs called present (recall) and of
absent pairs called absent (specificity). `--save DIR` writes a GSVA folder with the trained tower, to start other
probes or training runs from a "pretrained" CLIP.

    python benchmarks/probe_vision_features.py --steps 3000 --feature-layer -1
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_gsva import GSVAConfig  # noqa: E402
from gsva_hf.vision_pretraining import ImageContentLabels, train_vision_features  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor  # noqa: E402


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
