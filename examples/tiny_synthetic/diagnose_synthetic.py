"""Where a model trained on the synthetic GRES task stands: per-kind `[SEG]`/`[REJ]` accuracy and image dependence.

The gRefCOCO metrics mix masks and presence decisions. This splits the teacher-forced decisions by the kind of
expression the generator wrote (single object, attribute, several objects, relational; absent ones by what the
hard negative shares with a present object), and measures whether the decisions look at the image at all: the
`[SEG]`-minus-`[REJ]` logit margin at every slot with the right image, with every image replaced by another
val image, and with a black image. A model that grounds presence changes its margins when the image changes.
It also splits the masks by kind (the mask predicted at every present slot, whatever the decision) and asks how
well the last-layer state a mask is prompted from names its target's colour and shape (a ridge probe on the
single-object slots of the split and of the first train images): a mask decoder cannot tell apart two objects
its prompt does not.

    python examples/tiny_synthetic/diagnose_synthetic.py --model gsva_hf/assets/gsva-tiny-synthetic --dataset_dir data/synthetic
"""

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gsva_hf.data.collator import GSVACollator  # noqa: E402
from gsva_hf.data.mixed import build_val_dataset  # noqa: E402
from gsva_hf.data.synthetic import ALL_SHAPES, LABELS_NAME, PALETTE, phrase  # noqa: E402
from gsva_hf.metrics import intersection_and_union  # noqa: E402
from gsva_hf.teacher_forced import score_teacher_forced  # noqa: E402
from modeling_gsva import IMAGE_INPUTS, TOKEN_TYPE_INPUTS, GSVAForCausalLM  # noqa: E402
from processing_gsva import GSVAProcessor  # noqa: E402


def image_inputs(batch) -> dict:
    """A collated batch's image inputs: CLIP's pixels, or a composed VLM's (Qwen's grid, token types) as well."""
    return {name: batch[name] for name in (*IMAGE_INPUTS, *TOKEN_TYPE_INPUTS) if batch.get(name) is not None}


def slot_margins(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced `[SEG]` minus `[REJ]` logit one position before every slot, and whether GSVA's protocol counts
    the slot's decision as right (the argmax must be exactly the ground-truth token)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **image_inputs(batch)).logits
    margins, correct = [], []
    for row, (positions, seg) in enumerate(model.target_slots(batch["input_ids"])):
        slot_logits = logits[row, positions - 1].float()
        margins.append(slot_logits[:, model.config.seg_token_id] - slot_logits[:, model.config.rej_token_id])
        correct.append(slot_logits.argmax(-1) == batch["input_ids"][row, positions])
    return torch.cat(margins), torch.cat(correct)


def slot_overlaps(model, batch) -> list[tuple[int, int] | None]:
    """(intersection, union) in pixels of the mask GSVA's evaluation predicts at every ground-truth `[SEG]` slot,
    whatever the decision (its re-evaluation pass included, thresholded as its metric does), None at `[REJ]`."""
    out = score_teacher_forced(
        model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        sam_pixel_values=batch["sam_pixel_values"], original_sizes=batch["original_sizes"],
        reshaped_input_sizes=batch["reshaped_input_sizes"], reeval=True, mask_confirmed_rejections=False,
        **image_inputs(batch),
    )  # fmt: skip
    overlaps = []
    for masks, is_seg, truth in zip(out.pred_masks, out.slot_is_seg, batch["gt_masks"]):
        for mask, seg, target in zip(masks >= 0, is_seg.tolist(), truth):
            overlaps.append(overlap(mask, target) if seg else None)
    return overlaps


def overlap(mask: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(intersection, union) in pixels of a bool mask with a 0/1 ground truth, counted as GSVA's metrics count them."""
    return intersection_and_union(mask.cpu().numpy(), target.cpu().numpy().astype(np.uint8))


def overlap_scores(pairs: list[tuple[int, int]]) -> dict:
    """Targets, cIoU (summed intersections over summed unions) and mean IoU of (intersection, union) pairs."""
    return {
        "count": len(pairs),
        "ciou": sum(i for i, _ in pairs) / max(sum(u for _, u in pairs), 1),
        "miou": sum(i / max(u, 1) for i, u in pairs) / len(pairs),
    }


def mask_quality(overlaps: list, kinds: list[str]) -> dict:
    """Per kind and overall: present slots, cIoU (summed intersections over summed unions) and mean IoU."""
    groups = defaultdict(list)
    for kind, overlap in zip(kinds, overlaps):
        if overlap is not None:
            groups[kind].append(overlap)
            groups["all"].append(overlap)
    return {kind: overlap_scores(pairs) for kind, pairs in sorted(groups.items())}


# Every single-object phrase the generator can write (its own `phrase`), to its colour and shape indices.
SINGLE_OBJECT_PHRASES = {
    phrase(colour, shape, many): (i, j)
    for i, colour in enumerate(PALETTE)
    for j, shape in enumerate(ALL_SHAPES)
    for many in (False, True)
}


def colour_and_shape(text: str) -> tuple[int, int] | None:
    """Indices into `PALETTE` and `ALL_SHAPES` of a single-object phrase (`the red circle(s)`), None otherwise."""
    return SINGLE_OBJECT_PHRASES.get(" ".join(text.lower().split()))


def ridge_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, folds: int = 4, penalty: float = 10.0) -> float:
    """Cross-validated accuracy of a ridge classifier (one-hot targets, standardised features; slot i is held out
    in fold i mod `folds`): how linearly a state names a label."""
    x = features.double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    targets = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).double()
    fold = torch.arange(len(labels)) % folds
    right = 0
    for held in range(folds):
        train, test = fold != held, fold == held
        gram = x[train].T @ x[train] + penalty * torch.eye(x.shape[1], dtype=x.dtype)
        weights = torch.linalg.solve(gram, x[train].T @ targets[train])
        right += int(((x[test] @ weights).argmax(1) == labels[test]).sum())
    return right / len(labels)


def single_slot_states(model, collator, samples, kinds: dict, batch_size: int) -> tuple[list, list]:
    """The last-layer states that prompt the masks of single-object slots, with the ground-truth answer as context,
    and their (colour, shape) indices."""
    states, names = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collator(chunk)
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **image_inputs(batch)
        ).last_hidden_state
        slot_states, _, _ = model.gather_slot_states(hidden, batch["input_ids"])
        for row, sample in enumerate(chunk):
            for slot, (text, ref) in enumerate(zip(sample.targets, sample.meta["ref_ids"])):
                if kinds[ref] != "single":
                    continue
                named = colour_and_shape(text)
                if named is None:
                    raise ValueError(f"ref {ref}: single-object phrase {text!r} does not read 'the <colour> <shape>'")
                states.append(slot_states[row, slot].float())
                names.append(named)
    return states, names


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


def check_probe_train_images(count: int, split: str, name: str = "probe_train_images") -> None:
    """The train images the slot-state probe adds: none below zero, and none when the split is train itself."""
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    if count and split == "train":
        raise ValueError(f"the slot-state probe would count the train images twice: with split 'train' give {name} 0")


@torch.no_grad()
def diagnose(model_dir: Path, dataset_dir: Path, split: str, batch_size: int, probe_train_images: int = 500) -> dict:
    check_probe_train_images(probe_train_images, split)
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
    right, shuffled, black, correct, truth, slot_kinds, overlaps = [], [], [], [], [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collator(chunk)
        others = [items[(start + i + 1) % len(items)].image for i in range(len(chunk))]
        blacks = [Image.new("RGB", sample.image.size) for sample in chunk]
        margin, ok = slot_margins(model, batch)
        right.append(margin)
        overlaps += slot_overlaps(model, batch)
        correct.append(ok)
        truth.append(torch.cat([seg for _, seg in model.target_slots(batch["input_ids"])]))
        shuffled.append(slot_margins(model, with_images(collator, chunk, others, batch))[0])
        black.append(slot_margins(model, with_images(collator, chunk, blacks, batch))[0])
        slot_kinds += [kinds[ref] for sample in chunk for ref in sample.meta["ref_ids"]]
    right, shuffled, black, correct, truth = (torch.cat(x) for x in (right, shuffled, black, correct, truth))
    if not len(slot_kinds) == len(right) == len(overlaps):
        raise RuntimeError(
            f"{len(right)} slots, {len(overlaps)} mask slots and {len(slot_kinds)} ref ids: the val answers and refs disagree"
        )
    per_kind = defaultdict(list)
    for kind, ok in zip(slot_kinds, correct.tolist()):
        per_kind[kind].append(ok)
    grounded = torch.tensor([k == "single" or k.startswith("absent") for k in slot_kinds])
    probe_samples = list(items)
    if probe_train_images:
        train = build_val_dataset(dataset_dir, "grefcoco|unc|train")
        probe_samples += [train[i] for i in range(min(probe_train_images, len(train)))]
    states, names = single_slot_states(model, collator, probe_samples, kinds, batch_size)
    probe = {"train_images": len(probe_samples) - len(items), "single_slots": len(states)}
    if len(states) < 8:
        probe["not_run"] = f"{len(states)} single-object slots; the 4-fold probe needs at least 8"
    else:
        features, labels = torch.stack(states), torch.tensor(names)
        probe["colour_accuracy"] = ridge_probe_accuracy(features, labels[:, 0])
        probe["shape_accuracy"] = ridge_probe_accuracy(features, labels[:, 1])
    return {
        "slots": len(right),
        "grounded_slots": ranking_and_best_shift(right[grounded], truth[grounded]),
        "decision_accuracy": int(correct.sum()) / len(correct),
        "per_kind_accuracy": {k: {"count": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_kind.items())},
        "per_kind_masks": mask_quality(overlaps, slot_kinds),
        "slot_state_probe": probe,
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
    parser.add_argument(
        "--probe_train_images", type=int, default=500,
        help="train images whose single-object slots join the split's in the slot-state probe (0: the split's only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        check_probe_train_images(args.probe_train_images, args.split, "--probe_train_images")
    except ValueError as error:
        parser.error(str(error))
    report = diagnose(args.model, args.dataset_dir, args.split, args.batch_size, args.probe_train_images)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
