"""Segmentation metrics of GSVA, reproduced number for number.

Two families, each a streaming, mergeable accumulator:

* `GresAccumulator`: generalized referring segmentation (gRefCOCO, RefZOM) with gIoU, cIoU, N_acc and T_acc.
  `protocol="gsva"` (default) follows GSVA's `eval_gres`, which produced the paper and README numbers;
  `protocol="rela"` follows the official gRefCOCO evaluator of ReLA (HEAD), which zeroes the intersection of
  false positives and scores at 480x480.
* `RefSegAccumulator`: classic referring / reasoning segmentation (refCOCO/+/g, refclef, ReasonSeg) as GSVA's
  `validate`, with gIoU and cIoU.

The outcome names of gRefCOCO are GSVA's and ReLA's, where "positive" means "no target":
TP = empty GT and `[REJ]` predicted, FN = empty GT and a mask predicted, FP = a target exists but `[REJ]` was
predicted, TN = a target exists and a mask was predicted.

Accumulators keep plain sums (`state_dict()`), so per-process results can be gathered (for instance with
`torch.distributed.all_gather_object`) and combined with `merge`; they also keep one `SampleResult` per target
for a per-sample JSON (`write_json`). Integer sums merge exactly; the float sum of per-target IoUs is kept in
float64, so a merged result equals a single pass up to summation order (~1e-16 relative). GSVA itself sums in
float32; the difference is far below the 4 printed decimals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "RELA_EVAL_SIZE",
    "RELA_PR_THRESHOLDS",
    "GresAccumulator",
    "RefSegAccumulator",
    "SampleResult",
    "binarize",
    "check_gt_mask",
    "intersection_and_union",
    "resize_gt_mask",
    "resize_pred_mask",
    "strict_json",
    "union_instance_masks",
]

IGNORE_INDEX = 255
"""GT label excluded from intersection and union (GSVA's `intersectionAndUnionGPU(ignore_index=255)`)."""
RELA_EVAL_SIZE = 480
"""ReLA resizes images and polygons to a 480x480 square (`INPUT.IMAGE_SIZE`) and scores there."""
RELA_PR_THRESHOLDS = (0.7, 0.8, 0.9)
"""IoU thresholds of ReLA's Pr@X, counted over samples that have a target."""

_GRES_IOU_EPS = 1e-8  # eval_gres: I / (U + 1e-8)
_REFSEG_IOU_EPS = 1e-5  # validate: I / (U + 1e-5)
_CIOU_EPS = 1e-10  # both: sum(I) / (sum(U) + 1e-10)
_COUNT_EPS = 1e-5  # AverageMeter.all_reduce: avg = sum / (count + 1e-5)

MaskLike = np.ndarray | torch.Tensor | Sequence[Any]
Size = int | tuple[int, int]
GresProtocol = Literal["gsva", "rela"]
IgnoreMode = Literal["gsva", "lisa"]
Outcome = Literal["TP", "FN", "FP", "TN"]


# --------------------------------------------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------------------------------------------


def _to_numpy(value: MaskLike, name: str) -> np.ndarray:
    """Accept numpy arrays, torch tensors (any device/dtype) and nested lists, so callers need no conversions."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16/float16 have no numpy equivalent worth keeping
        return tensor.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise TypeError(f"{name} must be a numpy array, a torch tensor or a nested list, got {type(value).__name__}")


def _check_2d(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {tuple(array.shape)}")


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred_mask has shape {tuple(pred.shape)} but gt_mask has shape {tuple(gt.shape)}; they must match "
            "(post-process the prediction to the ground-truth size first)"
        )


def _as_flag(value: Any, name: str) -> bool:
    """A predicted-[REJ] flag may arrive as bool, 0/1, numpy scalar or one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single flag, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{name} must be a single flag, got an array of shape {value.shape}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a bool (or 0/1), got {value!r}")


def _size_hw(size: Size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        height = width = size
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        height, width = size
    else:
        raise ValueError(f"{name} must be an int or an (height, width) pair of ints, got {size!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return height, width


def binarize(pred_mask: MaskLike, threshold: float = 0.0, inclusive: bool = True) -> np.ndarray:
    """Turn a prediction into a boolean foreground mask.

    bool arrays are used as they are and integer arrays must hold only 0/1, so already-binary masks are never
    re-thresholded; floating arrays are logits, foreground where `logits >= threshold` (`inclusive`, GSVA's
    `eval_gres`) or `logits > threshold` (GSVA's `validate`, and ReLA's 2-way argmax where ties go to background).
    """
    array = _to_numpy(pred_mask, "pred_mask")
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array >= threshold if inclusive else array > threshold
    if np.issubdtype(array.dtype, np.integer):
        if not ((array == 0) | (array == 1)).all():
            found = np.unique(array[(array != 0) & (array != 1)])[:5].tolist()
            raise ValueError(
                f"pred_mask is an integer array, so it must be a binary 0/1 mask; found values {found} "
                "(pass floating-point logits to have them thresholded)"
            )
        return array.astype(bool)
    raise TypeError(f"pred_mask must be bool, integer 0/1 or floating logits, got dtype {array.dtype}")


def check_gt_mask(gt_mask: MaskLike) -> np.ndarray:
    """Validate a GT mask and return it as uint8 with 0 = background, 1 = target, 255 = ignore."""
    array = _to_numpy(gt_mask, "gt_mask")
    _check_2d(array, "gt_mask")
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if array.dtype == np.uint8 and (array.size == 0 or array.max() <= 1):
        return array  # the common 0/1 mask: one pass, no copy
    valid = (array == 0) | (array == 1) | (array == IGNORE_INDEX)
    if not valid.all():
        found = np.unique(array[~valid])[:5].tolist()
        raise ValueError(
            f"gt_mask must hold only 0 (background), 1 (target) and {IGNORE_INDEX} (ignore); found values {found}"
        )
    return array.astype(np.uint8)


def intersection_and_union(
    pred_mask: np.ndarray, gt_mask: np.ndarray, ignore_index: int | None = IGNORE_INDEX
) -> tuple[int, int]:
    """Foreground intersection and union, with GT pixels equal to `ignore_index` left out of both.

    Same numbers as index 1 of GSVA's `intersectionAndUnionGPU`: a predicted pixel on an ignored GT pixel counts
    nowhere. `pred_mask` is boolean, `gt_mask` is uint8 as returned by `check_gt_mask`.
    """
    _check_same_shape(pred_mask, gt_mask)
    target = gt_mask == 1
    pred = pred_mask
    if ignore_index is not None and (gt_mask.dtype != np.uint8 or gt_mask.size and gt_mask.max() >= ignore_index):
        pred = pred_mask & (gt_mask != ignore_index)
    intersection = int(np.count_nonzero(pred & target))
    union = int(np.count_nonzero(pred)) + int(np.count_nonzero(target)) - intersection
    return intersection, union


def union_instance_masks(masks: MaskLike | Sequence[MaskLike], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Merge the instance masks of one expression into its GT mask (gRefCOCO targets may be several objects).

    Foreground (1) wins over ignore (255), which wins over background (0). With no instance (a no-target
    expression) an all-zero mask of `shape` is returned, so `shape` is required then.
    """
    if isinstance(masks, (list, tuple)):
        stack = [check_gt_mask(m) for m in masks]
        if not stack:
            if shape is None:
                raise ValueError("union_instance_masks got no masks; pass shape=(H, W) for an empty target")
            return np.zeros(_size_hw(tuple(shape), "shape"), dtype=np.uint8)
        shapes = {m.shape for m in stack}
        if len(shapes) != 1:
            raise ValueError(f"masks must all have the same shape, got {sorted(shapes)}")
        array = np.stack(stack)
    else:
        array = _to_numpy(masks, "masks")
        if array.ndim != 3:
            raise ValueError(f"masks must be a (K, H, W) array or a list of (H, W) masks, got shape {array.shape}")
        if array.shape[0] == 0:
            return np.zeros(array.shape[1:], dtype=np.uint8)
        array = np.stack([check_gt_mask(m) for m in array])
    if shape is not None and array.shape[1:] != tuple(shape):
        raise ValueError(f"masks have shape {array.shape[1:]} but shape={tuple(shape)} was given")
    merged = np.zeros(array.shape[1:], dtype=np.uint8)
    merged[(array == IGNORE_INDEX).any(axis=0)] = IGNORE_INDEX
    merged[(array == 1).any(axis=0)] = 1
    return merged


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # Source pixel whose centre is nearest to each output centre: floor((i + 0.5) * n_in / n_out), in integers.
    return ((2 * np.arange(n_out) + 1) * n_in) // (2 * n_out)


def resize_gt_mask(gt_mask: MaskLike, size: Size = RELA_EVAL_SIZE) -> np.ndarray:
    """Nearest-neighbour resize of a GT mask to `size` for the ReLA protocol.

    Each output pixel takes the label of the input pixel under its centre (as `nearest-exact` / PIL NEAREST),
    so labels 0/1/255 survive unchanged. ReLA rasterises rescaled polygons instead; on masks this is the closest
    label-preserving equivalent, and thin structures may differ by a pixel.
    """
    gt = check_gt_mask(gt_mask)
    height, width = _size_hw(size)
    rows = _nearest_indices(gt.shape[0], height)
    cols = _nearest_indices(gt.shape[1], width)
    return gt.take(rows, axis=0).take(cols, axis=1)


def resize_pred_mask(pred_mask: MaskLike, size: Size = RELA_EVAL_SIZE) -> np.ndarray:
    """Resize a prediction to `size` for the ReLA protocol, before it is thresholded.

    Floating logits are resized bilinearly (`align_corners=False`, no antialiasing, like ReLA's upsampling of its
    mask scores) and returned as float32 logits, to be thresholded afterwards; binary masks (bool or 0/1
    integers) are resized with the same nearest rule as `resize_gt_mask`.
    """
    array = _to_numpy(pred_mask, "pred_mask")
    _check_2d(array, "pred_mask")
    height, width = _size_hw(size)
    if np.issubdtype(array.dtype, np.floating):
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
        return resized[0, 0].numpy()
    binary = binarize(array)
    rows = _nearest_indices(binary.shape[0], height)
    cols = _nearest_indices(binary.shape[1], width)
    return binary.take(rows, axis=0).take(cols, axis=1)


# --------------------------------------------------------------------------------------------------------------
# Accumulators
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    """What one target contributed, for per-sample JSON files and error analysis.

    `intersection` / `union` are the amounts added to the cIoU sums (so 0 where the protocol adds nothing, and
    I = 0 for a ReLA false positive); `iou` is the gIoU contribution. `outcome` and `pred_rejected` are None
    for refCOCO-style accumulators, which have no no-target decision.
    """

    sample_id: str | int | None
    intersection: int
    union: int
    iou: float
    gt_empty: bool
    pred_rejected: bool | None = None
    outcome: Outcome | None = None


def _json_safe(value: Any) -> Any:
    """NaN is not valid JSON; undefined metrics are written as null (numpy scalars become Python numbers first)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def strict_json(payload: Any, where: str, indent: int | None = 2) -> str:
    """`payload` as strict JSON text: NaN (an undefined metric) becomes null; an infinity, which JSON cannot hold
    and no metric should be, raises ValueError naming `where` (the file)."""
    try:
        return json.dumps(_json_safe(payload), indent=indent, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"{where}: cannot write it as JSON: {error} (an infinite value)") from error


class _Accumulator:
    """Shared bookkeeping: integer/float sums, per-sample records, merging and JSON output."""

    kind: ClassVar[str] = ""

    def __init__(self, keep_samples: bool) -> None:
        self.keep_samples = bool(keep_samples)
        self.samples: list[SampleResult] = []
        self._sums: dict[str, int | float] = self._zero_sums()

    def _zero_sums(self) -> dict[str, int | float]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Settings that must agree for two accumulators to be merged."""
        raise NotImplementedError

    def compute(self) -> dict[str, float | int]:
        raise NotImplementedError

    @property
    def sums(self) -> dict[str, int | float]:
        """A copy of the running sums (plain Python numbers)."""
        return dict(self._sums)

    def __len__(self) -> int:
        return int(self._sums["count"])

    def _record(self, result: SampleResult) -> SampleResult:
        if self.keep_samples:
            self.samples.append(result)
        return result

    def reset(self) -> None:
        """Forget everything added so far (e.g. between epochs)."""
        self.samples = []
        self._sums = self._zero_sums()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (kind, config, sums, per-sample records) for gathering across processes or pickling."""
        return {
            "kind": self.kind,
            "config": self.config(),
            "sums": dict(self._sums),
            "samples": [asdict(s) for s in self.samples],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Self:
        """Rebuild an accumulator from `state_dict()` output."""
        if state.get("kind") != cls.kind:
            raise ValueError(f"state has kind {state.get('kind')!r}, expected {cls.kind!r} for {cls.__name__}")
        accumulator = cls(**state["config"])
        accumulator._load_sums(state["sums"])
        accumulator.samples = [SampleResult(**s) for s in state["samples"]] if accumulator.keep_samples else []
        return accumulator

    def _load_sums(self, sums: Mapping[str, int | float]) -> None:
        expected = set(self._zero_sums())
        if set(sums) != expected:
            raise ValueError(f"sums must have exactly the keys {sorted(expected)}, got {sorted(sums)}")
        self._sums = dict(sums)

    def merge(self, other: Self | Mapping[str, Any]) -> Self:
        """Add another accumulator (or its `state_dict()`) into this one, in place; returns self."""
        if isinstance(other, Mapping):
            other = type(self).from_state_dict(other)
        if not isinstance(other, type(self)):
            raise TypeError(f"can only merge a {type(self).__name__} or its state dict, got {type(other).__name__}")
        if other.config() != self.config():
            raise ValueError(f"cannot merge accumulators with different settings: {self.config()} vs {other.config()}")
        for key, value in other._sums.items():
            self._sums[key] += value
        self.samples.extend(other.samples)
        return self

    def write_json(self, path: str | Path, **extra: Any) -> None:
        """Write config, metrics, and per-sample results (when kept) to `path`; `extra` is stored as given."""
        payload = {
            "kind": self.kind,
            "config": self.config(),
            "metrics": self.compute(),
            "sums": dict(self._sums),
            "samples": [asdict(s) for s in self.samples],
            **extra,
        }
        from .cli import write_text_replacing

        # Replaced whole or not at all: a full disk leaves the earlier file (or none) and an OSError naming `path`.
        write_text_replacing(path, strict_json(payload, str(path)))


class GresAccumulator(_Accumulator):
    """gRefCOCO / RefZOM metrics: gIoU, cIoU, N_acc, T_acc (ReLA protocol: also Pr@0.7/0.8/0.9).

    protocol="gsva" (GSVA's `eval_gres`, the published numbers):
        prediction `logits >= threshold`, scored at the size given; GT empty = no pixel labelled 1.
        TP: gIoU += 1, nothing to cIoU. FN: gIoU += 0 (whatever the mask), and with `refzom=False` the
        predicted area joins the cIoU union. FP and TN: IoU = I / (U + 1e-8) of the predicted mask, which is
        kept even when [REJ] was predicted; I and U join the cIoU sums.
        gIoU = sum / (count + 1e-5) (GSVA's all-reduce), cIoU = sum(I) / (sum(U) + 1e-10),
        N_acc = TP / (TP + FN), T_acc = TN / (TN + FP); an accuracy without samples is NaN (GSVA would crash).
    protocol="rela" (ReLA's official evaluator):
        prediction `logits > threshold`; prediction and GT are resized to `eval_size` (480x480 by default,
        see `resize_pred_mask` / `resize_gt_mask`) while GT emptiness is decided on the original mask, as ReLA
        takes it from the annotation. FP forces I = 0 (IoU 0) but keeps U; IoU = I / U, 0 when U = 0.
        gIoU = sum / count, cIoU = sum(I) / sum(U), Pr@X = #(IoU >= X) / #non-empty; N_acc and T_acc are 0
        when there is no empty sample, and any other undefined ratio is 0. ReLA prints them x100; these are
        fractions.

    Pixels labelled 255 in the GT are left out of I and U in both protocols.
    """

    kind: ClassVar[str] = "gres"

    def __init__(
        self,
        protocol: GresProtocol = "gsva",
        *,
        refzom: bool = False,
        eval_size: Size | Literal["auto"] | None = "auto",
        threshold: float = 0.0,
        keep_samples: bool = True,
    ) -> None:
        if protocol not in ("gsva", "rela"):
            raise ValueError(f"protocol must be 'gsva' or 'rela', got {protocol!r}")
        if refzom and protocol != "gsva":
            raise ValueError("refzom=True only exists in GSVA's evaluator; use it with protocol='gsva'")
        self.protocol: GresProtocol = protocol
        self.refzom = bool(refzom)
        if eval_size == "auto":
            eval_size = RELA_EVAL_SIZE if protocol == "rela" else None
        self.eval_size: tuple[int, int] | None = None if eval_size is None else _size_hw(eval_size, "eval_size")
        self.threshold = float(threshold)
        super().__init__(keep_samples)

    def _zero_sums(self) -> dict[str, int | float]:
        sums: dict[str, int | float] = {
            "count": 0,
            "tp": 0,
            "fn": 0,
            "fp": 0,
            "tn": 0,
            "intersection": 0,
            "union": 0,
            "iou_sum": 0.0,
        }
        if self.protocol == "rela":
            sums.update({f"pr@{t}": 0 for t in RELA_PR_THRESHOLDS})
        return sums

    def config(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "refzom": self.refzom,
            "eval_size": None if self.eval_size is None else list(self.eval_size),
            "threshold": self.threshold,
            "keep_samples": self.keep_samples,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Self:
        """Rebuild an accumulator from `state_dict()` output."""
        config = dict(state["config"])
        if config.get("eval_size") is not None:
            config["eval_size"] = tuple(config["eval_size"])
        return super().from_state_dict({**state, "config": config})

    def scored_form(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` in the form `add` scores them, computed where they live: the bool mask `add` would threshold
        (so no float map needs to travel or be copied), or the logits themselves when the protocol resizes first."""
        if self.eval_size is not None:
            return logits
        return logits >= self.threshold if self.protocol == "gsva" else logits > self.threshold

    def add(
        self, pred_mask: MaskLike, gt_mask: MaskLike, pred_rejected: Any, sample_id: str | int | None = None
    ) -> SampleResult:
        """Score one target (one expression).

        pred_mask: (H, W) bool / 0-1 mask, or float logits thresholded per protocol.
        gt_mask: (H, W) with 0/1/255 (bool accepted), the union of the expression's instances.
        pred_rejected: whether [REJ] was predicted for this target (GSVA: teacher-forced decision of the first
            pass, not mask emptiness).
        """
        rejected = _as_flag(pred_rejected, "pred_rejected")
        gt = check_gt_mask(gt_mask)
        pred = _to_numpy(pred_mask, "pred_mask")
        _check_2d(pred, "pred_mask")
        _check_same_shape(pred, gt)
        gt_empty = not bool((gt == 1).any())
        if self.eval_size is not None:
            gt = resize_gt_mask(gt, self.eval_size)
            pred = resize_pred_mask(pred, self.eval_size)
        binary = binarize(pred, self.threshold, inclusive=self.protocol == "gsva")
        inter, union = intersection_and_union(binary, gt)

        sums = self._sums
        sums["count"] += 1
        outcome: Outcome
        if gt_empty:
            inter = 0  # nothing is labelled 1, so no intersection either way
            if rejected:
                outcome, iou, union = "TP", 1.0, 0
            else:
                outcome, iou = "FN", 0.0
                if self.refzom:
                    union = 0
        else:
            outcome = "FP" if rejected else "TN"
            if self.protocol == "gsva":
                iou = inter / (union + _GRES_IOU_EPS)
            else:
                if rejected:
                    inter = 0
                iou = inter / union if union > 0 else 0.0
                for t in RELA_PR_THRESHOLDS:
                    if iou >= t:
                        sums[f"pr@{t}"] += 1
        sums[outcome.lower()] += 1
        sums["intersection"] += inter
        sums["union"] += union
        sums["iou_sum"] += iou
        return self._record(SampleResult(sample_id, inter, union, float(iou), gt_empty, rejected, outcome))

    def add_batch(
        self,
        pred_masks: MaskLike | Sequence[MaskLike],
        gt_masks: MaskLike | Sequence[MaskLike],
        pred_rejected: Sequence[Any] | MaskLike,
        sample_ids: Sequence[str | int | None] | None = None,
    ) -> list[SampleResult]:
        """Score the targets of one image (or any batch): (N, H, W) masks and N flags, in the same order."""
        n = len(pred_masks)
        lengths = {"gt_masks": len(gt_masks), "pred_rejected": len(pred_rejected)}
        if sample_ids is not None:
            lengths["sample_ids"] = len(sample_ids)
        for name, length in lengths.items():
            if length != n:
                raise ValueError(f"{name} has {length} entries but pred_masks has {n}; they must match")
        ids = list(sample_ids) if sample_ids is not None else [None] * n
        return [self.add(pred_masks[i], gt_masks[i], pred_rejected[i], ids[i]) for i in range(n)]

    def compute(self) -> dict[str, float | int]:
        """Final metrics (fractions, not percentages) plus the raw counts."""
        s = self._sums
        count, tp, fn, fp, tn = (int(s[k]) for k in ("count", "tp", "fn", "fp", "tn"))
        inter, union, iou_sum = int(s["intersection"]), int(s["union"]), float(s["iou_sum"])
        result: dict[str, float | int] = {}
        if self.protocol == "gsva":
            result["giou"] = iou_sum / (count + _COUNT_EPS)
            result["ciou"] = inter / (union + _CIOU_EPS)
            result["n_acc"] = tp / (tp + fn) if tp + fn else math.nan
            result["t_acc"] = tn / (tn + fp) if tn + fp else math.nan
        else:
            result["giou"] = iou_sum / count if count else 0.0
            result["ciou"] = inter / union if union else 0.0
            has_empty = tp + fn > 0
            result["n_acc"] = tp / (tp + fn) if has_empty else 0.0
            result["t_acc"] = tn / (tn + fp) if has_empty and tn + fp else 0.0
            for t in RELA_PR_THRESHOLDS:
                result[f"pr@{t}"] = int(s[f"pr@{t}"]) / (tn + fp) if tn + fp else 0.0
        result.update({"count": count, "tp": tp, "fn": fn, "fp": fp, "tn": tn, "intersection": inter, "union": union})
        return result

    def format_log_line(self, dataset: str | None = None, epoch: int | None = None) -> str:
        """GSVA's `eval_gres` log line, e.g. `grefcoco giou: 0.6347, ciou: 0.6165, N_acc: 0.5698, T_acc: 0.9954.`

        `dataset` defaults to `refzom` / `grefcoco`; `epoch`, when given, is printed as GSVA's `[epoch] ` prefix
        (GSVA prints its 0-based epoch + 1). The ReLA protocol appends its Pr@X values before the final period.
        """
        m = self.compute()
        name = dataset if dataset is not None else ("refzom" if self.refzom else "grefcoco")
        prefix = "" if epoch is None else f"[{epoch:d}] "
        line = (
            f"{prefix}{name} giou: {m['giou']:.4f}, ciou: {m['ciou']:.4f}, "
            f"N_acc: {m['n_acc']:.4f}, T_acc: {m['t_acc']:.4f}"
        )
        if self.protocol == "rela":
            line += "".join(f", Pr@{t}: {m[f'pr@{t}']:.4f}" for t in RELA_PR_THRESHOLDS)
        return line + "."


class RefSegAccumulator(_Accumulator):
    """refCOCO/+/g, refclef and ReasonSeg metrics as GSVA's (and LISA's) `validate`.

    Prediction `logits > threshold`; per target IoU = I / (U + 1e-5), plus 1.0 when U == 0 (empty prediction
    on an empty GT scores 1); gIoU = sum / (count + 1e-5) over targets (per expression, GSVA's all-reduce),
    cIoU = sum(I) / (sum(U) + 1e-10).

    ignore_mode decides what GT 255 ("ignore" polygons of ReasonSeg) means:
        "gsva": foreground, as GSVA's `ValDataset` turns every GT into `masks.bool().byte()`;
        "lisa": left out of I and U, as LISA keeps 255 and `intersectionAndUnionGPU` ignores it.
    """

    kind: ClassVar[str] = "refseg"

    def __init__(self, ignore_mode: IgnoreMode = "gsva", *, threshold: float = 0.0, keep_samples: bool = True) -> None:
        if ignore_mode not in ("gsva", "lisa"):
            raise ValueError(
                f"ignore_mode must be 'gsva' (255 is foreground) or 'lisa' (255 ignored), got {ignore_mode!r}"
            )
        self.ignore_mode: IgnoreMode = ignore_mode
        self.threshold = float(threshold)
        super().__init__(keep_samples)

    def _zero_sums(self) -> dict[str, int | float]:
        return {"count": 0, "intersection": 0, "union": 0, "iou_sum": 0.0}

    def config(self) -> dict[str, Any]:
        return {"ignore_mode": self.ignore_mode, "threshold": self.threshold, "keep_samples": self.keep_samples}

    def scored_form(self, logits: torch.Tensor) -> torch.Tensor:
        """The bool mask `add` would threshold from `logits`, computed where they live."""
        return logits > self.threshold

    def add(self, pred_mask: MaskLike, gt_mask: MaskLike, sample_id: str | int | None = None) -> SampleResult:
        """Score one target: (H, W) prediction (bool / 0-1 / float logits) against an (H, W) 0/1/255 GT."""
        gt = check_gt_mask(gt_mask)
        pred = _to_numpy(pred_mask, "pred_mask")
        _check_2d(pred, "pred_mask")
        _check_same_shape(pred, gt)
        if self.ignore_mode == "gsva" and gt.size and gt.max() == IGNORE_INDEX:
            gt = np.where(gt == IGNORE_INDEX, 1, gt).astype(np.uint8)
        binary = binarize(pred, self.threshold, inclusive=False)
        inter, union = intersection_and_union(binary, gt)
        iou = inter / (union + _REFSEG_IOU_EPS) + (1.0 if union == 0 else 0.0)
        s = self._sums
        s["count"] += 1
        s["intersection"] += inter
        s["union"] += union
        s["iou_sum"] += iou
        return self._record(SampleResult(sample_id, inter, union, float(iou), not bool((gt == 1).any())))

    def add_batch(
        self,
        pred_masks: MaskLike | Sequence[MaskLike],
        gt_masks: MaskLike | Sequence[MaskLike],
        sample_ids: Sequence[str | int | None] | None = None,
    ) -> list[SampleResult]:
        """Score the targets of one image (or any batch): (N, H, W) predictions and GTs in the same order."""
        n = len(pred_masks)
        if len(gt_masks) != n:
            raise ValueError(f"gt_masks has {len(gt_masks)} entries but pred_masks has {n}; they must match")
        if sample_ids is not None and len(sample_ids) != n:
            raise ValueError(f"sample_ids has {len(sample_ids)} entries but pred_masks has {n}; they must match")
        ids = list(sample_ids) if sample_ids is not None else [None] * n
        return [self.add(pred_masks[i], gt_masks[i], ids[i]) for i in range(n)]

    def compute(self) -> dict[str, float | int]:
        """gIoU and cIoU (fractions) plus the raw sums."""
        s = self._sums
        count, inter, union = int(s["count"]), int(s["intersection"]), int(s["union"])
        return {
            "giou": float(s["iou_sum"]) / (count + _COUNT_EPS),
            "ciou": inter / (union + _CIOU_EPS),
            "count": count,
            "intersection": inter,
            "union": union,
        }

    def format_log_line(self, dataset: str, epoch: int | None = None) -> str:
        """GSVA's `validate` log line, e.g. `On ReasonSeg giou: 0.5000, ciou: 0.4000.` (`[epoch] ` prefix optional)."""
        m = self.compute()
        prefix = "" if epoch is None else f"[{epoch:d}] "
        return f"{prefix}On {dataset} giou: {m['giou']:.4f}, ciou: {m['ciou']:.4f}."
