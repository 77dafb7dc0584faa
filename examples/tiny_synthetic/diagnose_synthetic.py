"""Where a model trained on the synthetic GRES task stands: per-kind `[SEG]`/`[REJ]` accuracy and image dependence.

The gRefCOCO metrics mix masks and presence decisions. This splits the teacher-forced decisions by the kind of
expression the generator wrote (single object, attribute, several objects, relational; absent ones by what the
hard negative shares with a present object), and measures whether the decisions look at the image at all: the
`[SEG]`-minus-`[REJ]` logit margin at every slot with the right image, with every image replaced by another
val image, and with a black image. A model that grounds presence changes its margins when the image changes.

    python examples/tiny_synthetic/diagnose_synthetic.py --model gsva_hf/assets/gsva-tiny-synthetic --dataset_dir data/synthetic
"""

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gsva_hf.data.collator import GSVACollator  # noqa: E402
from gsva_hf.data.mixed import build_val_dataset  # noqa: E402
from gsva_hf.data.synthetic import LABELS_NAME  # noqa: E402
from modeling_gsva import IMAGE_INPUTS, TOKEN_TYPE_INPUTS, GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor  # noqa: E402


def image_inputs(batch) -> dict:
    """A collated batch's image inputs: CLIP's pixels, or a composed VLM's (Qwen's grid, token types) as well."""
    return {name: batch[name] for name in (*IMAGE_INPUTS, *TOKEN_TYPE_INPUTS) if batch.get(name) is not None}


def slot_margins(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced `[SEG]` minus `[REJ]` logit one position before every slot, whether GSVA's protocol counts the
    slot's decision as right (the argmax must be exactly the ground-truth token), and the slots' truth."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **image_inputs(batch)).logits
    margins, correct = [], []
    for row, (positions, seg) in enumerate(model.target_slots(batch["input_ids"])):
        slot_logits = logits[row, positions - 1].float()
        margins.append(slot_logits[:, model.config.seg_token_id] - slot_logits[:, model.config.rej_token_id])
        correct.append(slot_logits.argmax(-1) == batch["input_ids"][row, positions])
    return torch.cat(margins), torch.cat(correct)


def with_images(collator, chunk, images, batch) -> dict:
    """`chunk` collated with `images` in place of its own, through the processor as for the real ones (so every VLM
    family gets its own image inputs); the questions and answers must tokenise exactly as in `batch`."""
    replay = collator([dataclasses.replace(sample, image=image) for sample, image in zip(chunk, images)])
    if not torch.equal(replay["input_ids"], batch["input_ids"]):
        raise RuntimeError("the replayed images changed the token sequence: the val images must share one size")
    return replay


def ranking_and_best_shift(margins: torch.Tensor, present: torch.Tensor) -> dict:
    """How well the margins rank present above absent slots (ROC AUC, ties count half), and the decision accuracy
    if one constant were added to every margin at its best value: a high AUC with a low accuracy means the model
    grounds but its `[SEG]`/`[REJ]` bias is off; a low AUC means it does not ground."""
    pos, neg = margins[present], margins[~present]
    if len(pos) == 0 or len(neg) == 0:
        return {"auc": float("nan"), "accuracy_at_best_shift": float("nan"), "best_shift": float("nan")}
    greater = (pos[:, None] > neg[None, :]).float().mean().item()
    ties = (pos[:, None] == neg[None, :]).float().mean().item()
    cuts = torch.cat([margins.sort().values, margins.max()[None] + 1])
    accuracy = torch.stack([((margins >= cut) == present).float().mean() for cut in cuts])
    best = int(accuracy.argmax())
    return {"auc": greater + ties / 2, "accuracy_at_best_shift": accuracy[best].item(), "best_shift": -cuts[best].item()}


@torch.no_grad()
def diagnose(model_dir: Path, dataset_dir: Path, split: str, batch_size: int) -> dict:
    labels_path = dataset_dir / LABELS_NAME
    if not labels_path.is_file():
        raise SystemExit(f"{labels_path} not found: --dataset_dir must hold the synthetic task (python -m gsva_hf.data.synthetic)")
    labels = json.loads(labels_path.read_text())
    kinds = {r["ref_id"]: r["kind"] if r["kind"] != "absent" else f"absent ({r['negative']})" for r in labels["refs"]}
    model = GSVAForCausalLM.from_pretrained(model_dir).eval()
    processor = GSVAProcessor.from_pretrained(model_dir)
    dataset = build_val_dataset(dataset_dir, f"grefcoco|unc|{split}")
    collator = GSVACollator(processor)
    items = [dataset[i] for i in range(len(dataset))]
    right, shuffled, black, correct, truth, slot_kinds = [], [], [], [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collator(chunk)
        others = [items[(start + i + 1) % len(items)].image for i in range(len(chunk))]
        blacks = [Image.new("RGB", sample.image.size) for sample in chunk]
        margin, ok = slot_margins(model, batch)
        right.append(margin)
        correct.append(ok)
        truth.append(torch.cat([seg for _, seg in model.target_slots(batch["input_ids"])]))
        shuffled.append(slot_margins(model, with_images(collator, chunk, others, batch))[0])
        black.append(slot_margins(model, with_images(collator, chunk, blacks, batch))[0])
        slot_kinds += [kinds[ref] for sample in chunk for ref in sample.meta["ref_ids"]]
    right, shuffled, black, correct, truth = (torch.cat(x) for x in (right, shuffled, black, correct, truth))
    if len(slot_kinds) != len(right):
        raise RuntimeError(f"{len(right)} slots but {len(slot_kinds)} ref ids: the val answers and refs disagree")
    per_kind = defaultdict(list)
    for kind, ok in zip(slot_kinds, correct.tolist()):
        per_kind[kind].append(ok)
    grounded = torch.tensor([k == "single" or k.startswith("absent") for k in slot_kinds])
    return {
        "slots": len(right),
        "grounded_slots": ranking_and_best_shift(right[grounded], truth[grounded]),
        "decision_accuracy": int(correct.sum()) / len(correct),
        "per_kind_accuracy": {k: {"count": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_kind.items())},
        "margin_std": right.std().item(),
        "mean_abs_change_other_image": (right - shuffled).abs().mean().item(),
        "mean_abs_change_black_image": (right - black).abs().mean().item(),
        "correlation_right_vs_other_image": torch.corrcoef(torch.stack([right, shuffled]))[0, 1].item(),
        "decisions_changed_by_other_image": ((right > 0) != (shuffled > 0)).float().mean().item(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dataset_dir", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    print(json.dumps(diagnose(args.model, args.dataset_dir, args.split, args.batch_size), indent=2))


if __name__ == "__main__":
    main()
