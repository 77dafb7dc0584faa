"""GSVA's evaluation loop: teacher-forced (the paper's protocol) or generated answers, one or many processes.

Every image's targets are scored into that image's own accumulator; accumulators are merged in dataset order,
and processes share out whole batches, so 1 and N processes give bit-identical numbers and every sample counts
exactly once.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline_gsva import segment

from .data.collator import GSVACollator
from .metrics import GresAccumulator, RefSegAccumulator
from .teacher_forced import score_teacher_forced

GRES_DATASETS = ("grefcoco", "refzom")
MODES = ("teacher_forced", "targets", "generate")
logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    dataset: str
    mode: str
    metrics: dict
    log_line: str
    accumulator: object
    records: list[dict] = field(default_factory=list)
    errors: int = 0  # samples with no prediction (their record has "error"), scored as all [REJ] with empty masks


def dataset_image_paths(dataset) -> list[str] | None:
    """The image file of every sample, read from the reader's index (no image is decoded); None when the images
    are not files (a datasets source embeds them) or the reader is unknown."""
    if hasattr(dataset, "image_ids") and hasattr(getattr(dataset, "data", None), "image_dir"):
        return [dataset.data.images[image_id].path for image_id in dataset.image_ids]
    if isinstance(getattr(dataset, "images", None), list):
        return [str(path) for path in dataset.images]
    return None


def unreadable_images(paths: list[str]) -> list[str]:
    """`path: reason` for each image file that is missing or whose header Pillow cannot read."""
    from PIL import Image

    problems = []
    for path in dict.fromkeys(paths):
        try:
            with Image.open(path):
                pass
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            problems.append(f"{path}: {error}")
    return problems


def dataset_name(dataset) -> str:
    spec = getattr(dataset, "spec", "") or ""
    return spec.split("|")[0] if spec else type(dataset).__name__


def new_accumulator(name: str, protocol: str, ignore_mode: str):
    if name in GRES_DATASETS:
        return GresAccumulator(protocol=protocol, refzom=name == "refzom")
    return RefSegAccumulator(ignore_mode=ignore_mode)


@torch.no_grad()
def evaluate_dataset(
    model,
    processor,
    dataset,
    mode: str = "teacher_forced",
    protocol: str = "gsva",
    ignore_mode: str = "gsva",
    batch_size: int = 4,
    max_new_tokens: int = 256,
    accelerator=None,
    progress: bool = True,
) -> EvaluationResult:
    """Score `dataset` (a validation reader yielding `Sample`s) with GSVA's metrics.

    mode "teacher_forced" (`teacher_forced.score_teacher_forced`): the ground-truth answer is fed; `[SEG]`/`[REJ]`
    decided one position earlier, every target masked after re-evaluation (gRefCOCO) — reproduces the published
    numbers. mode "targets": the
    ground-truth expressions go through the user path, `segment(targets=...)`: the model decides each slot itself,
    exactly one result per expression. mode "generate": the model answers the same question itself; slots pair
    with targets in order, a missing slot counts as `[REJ]` with an empty mask, extra slots are ignored (both
    counted in the records).

    A sample the model cannot be run on (a ValueError: an expression target mode cannot write, outputs that are
    not finite) costs only itself: its record holds "error", every slot of it counts as `[REJ]` with an empty
    mask, `errors` counts it and a warning names it. Only when no sample at all could be run does it raise.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    name = dataset_name(dataset)
    is_gres = name in GRES_DATASETS
    # Processes share out whole batches, so every batch is the one a single process would run: same numbers.
    batches = [list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset), batch_size)]
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(batches) as mine:
            batches = list(mine)
    collator = GSVACollator(processor, return_samples=True)
    model_device = next(model.parameters()).device
    local: list[tuple[int, dict, dict]] = []
    from tqdm.auto import tqdm

    show = progress and (accelerator is None or accelerator.is_local_main_process)
    bar = tqdm(total=sum(map(len, batches)), desc=f"eval {name} ({mode})", unit="image", disable=not show)

    def predict(samples: list) -> list[tuple[torch.Tensor, list[bool], str | None]]:
        """(masks in the scorer's form, rejected per slot, answer or None) per sample, in order."""
        if mode == "teacher_forced":
            batch = collator(samples)
            batch.pop("samples")
            batch.pop("gt_masks")
            batch = {k: v.to(model_device) for k, v in batch.items() if k != "labels"}
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            batch["sam_pixel_values"] = batch["sam_pixel_values"].to(model.dtype)
            # A target that is absent and rejected scores the same whatever its mask: no mask is computed for it.
            out = score_teacher_forced(model, **batch, reeval=is_gres, mask_confirmed_rejections=False)
            for row, logits in enumerate(out.pred_masks):
                if not bool(torch.isfinite(logits).all()):
                    raise ValueError(f"image {row}: the model's mask logits are not finite")
            scorer = new_accumulator(name, protocol, ignore_mode)
            return [
                (scorer.scored_form(out.pred_masks[row]).cpu(), out.rejected[row].cpu().tolist(), None)
                for row in range(len(samples))
            ]
        images = [sample.image for sample in samples]
        if mode == "targets":
            results = segment(model, processor, images, targets=[list(s.targets) for s in samples], batch_size=batch_size)
        else:
            questions = [sample.rounds[0][0] for sample in samples]
            results = segment(model, processor, images, text=questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return [_pair_generated(result, sample) for result, sample in zip(results, samples)]

    for chunk in batches:
        samples = [dataset[i] for i in chunk]
        predictions = _predict_each(predict, samples)
        for index, sample, prediction in zip(chunk, samples, predictions):
            error = None
            if isinstance(prediction, ValueError):
                error, prediction = f"{type(prediction).__name__}: {prediction}", _undecided(sample)
            masks, rejected, answer = prediction
            accumulator = new_accumulator(name, protocol, ignore_mode)
            for slot in range(sample.masks.shape[0]):
                # ReasonSeg keeps its 255 "ignore" pixels in `gt_labels`; the accumulator's ignore_mode decides.
                labels = getattr(sample, "gt_labels", None)
                gt = labels[slot] if labels is not None else sample.masks[slot].astype(np.uint8)
                sample_id = f"{index}:{slot}"
                if is_gres:
                    accumulator.add(masks[slot], gt, bool(rejected[slot]), sample_id)
                else:
                    accumulator.add(masks[slot], gt, sample_id)
            record = {
                "index": index,
                "image": sample.image_path,
                "targets": list(sample.targets),
                "gt_rejected": [bool(r) for r in sample.rejected],
                "pred_rejected": [bool(r) for r in rejected],
                "meta": _plain(sample.meta) if hasattr(sample, "meta") else {},
            }
            if answer is not None:
                record["answer"] = answer
            if error is not None:
                record["error"] = error
            local.append((index, accumulator.state_dict(), record))
        bar.update(len(chunk))
    bar.close()

    gathered = local
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object(local)
    seen, total, records = set(), None, []
    for index, state, record in sorted(gathered, key=lambda item: item[0]):
        if index in seen:
            continue
        seen.add(index)
        part = type(new_accumulator(name, protocol, ignore_mode)).from_state_dict(state)
        total = part if total is None else total.merge(part)
        records.append(record)
    if total is None:
        total = new_accumulator(name, protocol, ignore_mode)
    failed = [record for record in records if "error" in record]
    if failed and len(failed) == len(records):
        raise ValueError(f"{name} ({mode}): no sample could be evaluated; the first: {failed[0]['error']}")
    if failed:
        first = failed[0]
        logger.warning(
            "%s (%s): %d of %d samples have no prediction and count as [REJ] with empty masks (their records hold "
            '"error"); the first, sample %d (%s): %s', name, mode, len(failed), len(records), first["index"],
            first["image"], first["error"],
        )  # fmt: skip
    metrics = total.compute()
    log_line = total.format_log_line(name)
    return EvaluationResult(
        dataset=name, mode=mode, metrics=metrics, log_line=log_line, accumulator=total, records=records, errors=len(failed)
    )


def _predict_each(predict, samples: list) -> list:
    """`predict(samples)`, or when it raises ValueError, sample by sample, so a sample the model cannot be run on
    costs only itself: its entry is the error."""
    try:
        return predict(samples)
    except ValueError as error:
        if len(samples) == 1:
            return [error]
    results = []
    for sample in samples:
        try:
            results += predict([sample])
        except ValueError as error:
            results.append(error)
    return results


def _undecided(sample) -> tuple[torch.Tensor, list[bool], None]:
    """A sample without a prediction, scored as generate mode scores a missing slot: `[REJ]` with an empty mask."""
    count, height, width = sample.masks.shape
    return torch.zeros(count, height, width, dtype=torch.bool), [True] * count, None


def _pair_generated(result, sample) -> tuple[torch.Tensor, list[bool], str]:
    """Generated slots → per ground-truth target (bool mask, rejected), paired in text order."""
    height, width = sample.masks.shape[1:]
    masks, rejected = [], []
    for slot in range(sample.masks.shape[0]):
        if slot < len(result.targets):
            target = result.targets[slot]
            masks.append(target.mask)
            rejected.append(target.rejected)
        else:
            masks.append(torch.zeros(height, width, dtype=torch.bool))
            rejected.append(True)
    stacked = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
    return stacked, rejected, result.answer


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value
