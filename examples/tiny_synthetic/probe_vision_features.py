"""How fast can the tiny preset's CLIP tower learn what the synthetic images hold, given direct supervision?

The vision side alone, as `train_tiny.py --vision_pretrain_steps` trains it (`vision_pretraining.py`): CLIP and
the projector learn, through a linear head, which colour+shape pairs each image holds (`--target image`: val recall
of present pairs and specificity) or the colour+shape of the object under each patch (`--target patches`: val
accuracy on object patches, colour and shape both right and each alone, and on background patches). `--save DIR` writes a GSVA folder with the
trained tower, to start other probes or training runs from a "pretrained" CLIP. `--probe-model DIR` instead fits
only the linear head on a trained model's image tokens: what its language model can read off each token; it first
prints how much of those tokens' variance colour, shape and their pair explain.

    python examples/tiny_synthetic/probe_vision_features.py --steps 3000
    python examples/tiny_synthetic/probe_vision_features.py --target patches --lr 3e-3 --steps 3000
    python examples/tiny_synthetic/probe_vision_features.py --target patches --probe-model gsva_hf/assets/gsva-tiny-synthetic --steps 1000
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configuration_gsva import GSVAConfig  # noqa: E402
from examples.tiny_synthetic.from_scratch import apply_config_overrides  # noqa: E402
from examples.tiny_synthetic.vision_pretraining import TARGETS, PatchContentLabels, patch_grid, train_vision_features  # noqa: E402
from modeling_gsva import GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor  # noqa: E402


def variance_shares(features: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each labelling of the rows of `features` [N, D], the share of their total variance that lies between its
    groups' means (1: the label alone fixes the feature; 0: the feature ignores it)."""
    centred = features - features.mean(0)
    total = centred.pow(2).sum()
    shares = {}
    for name, labels in groups.items():
        between = sum(
            (labels == value).sum() * centred[labels == value].mean(0).pow(2).sum() for value in labels.unique()
        )
        shares[name] = float(between / total)
    return shares


def token_variance_shares(model, image_processor, dataset_dir: Path) -> dict[str, float]:
    """How much of the val object patches' image tokens, RMS-normalised as the language model's first norm sees
    them, colour, shape and their pair explain: what is loud enough for the language model to pick up first."""
    labels = PatchContentLabels(dataset_dir, "val", patch_grid(model))
    with torch.no_grad():
        pixels = image_processor(labels.images, return_tensors="pt")["pixel_values"]
        tokens = model.get_image_features(pixels.to(model.dtype)).float()
    tokens = tokens / tokens.pow(2).mean(-1, keepdim=True).sqrt()
    on_object = labels.targets != labels.background
    pairs = labels.targets[on_object]
    groups = {"colour": labels.colour_of[pairs], "shape": labels.shape_of[pairs], "pair": pairs}
    return variance_shares(tokens[on_object], groups)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=Path, default=None, help="a preset folder (default configs/gsva-tiny)")
    parser.add_argument("--dataset_dir", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument(
        "--config_overrides", default=None,
        help="as train_tiny.py's, applied to the preset (default 'vision_feature_layer=-1', the embedded default's)",
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target", choices=sorted(TARGETS), default="image")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write a GSVA folder with the trained tower here")
    parser.add_argument(
        "--probe-model", type=Path, default=None,
        help="instead: a trained GSVA folder whose image tokens get only a linear probe (the tower stays as it is)",
    )
    args = parser.parse_args(argv)
    if args.probe_model and (args.save or args.preset or args.config_overrides is not None):
        parser.error("--probe-model probes a trained model as it is: drop --save, --preset and --config_overrides")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    if args.probe_model:
        model = GSVAForCausalLM.from_pretrained(args.probe_model).eval()
        processor = GSVAProcessor.from_pretrained(args.probe_model)
        shares = token_variance_shares(model, processor.image_processor, args.dataset_dir)
        print("variance of val object-patch tokens explained by " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    else:
        preset = args.preset or ROOT / "configs" / "gsva-tiny"
        config = GSVAConfig.from_pretrained(preset)
        apply_config_overrides(config, "vision_feature_layer=-1" if args.config_overrides is None else args.config_overrides)
        model = GSVAForCausalLM._from_config(config)
        processor = GSVAProcessor.from_pretrained(preset)
    train, val = (TARGETS[args.target](args.dataset_dir, split, model) for split in ("train", "val"))
    header = []

    def print_row(row: dict) -> None:
        if not header:
            header.extend(row)
            print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
        print("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in header) + " |", flush=True)

    train_vision_features(
        model, processor.image_processor, train, val, args.steps, args.batch_size, args.lr, args.eval_every, args.seed,
        on_row=print_row, train_tower=args.probe_model is None,
    )  # fmt: skip
    if args.save:
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
