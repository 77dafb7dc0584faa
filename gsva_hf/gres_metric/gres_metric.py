"""gRefCOCO / RefZOM metrics (gIoU, cIoU, N_acc, T_acc) as an `evaluate` module.

Why a thin wrapper: `evaluate` copies this script into its module cache and imports it from there, so a relative
import of project files would break; the arithmetic stays in one place, `gsva_hf.metrics`, imported absolutely.
`evaluate` checks that import before running the script and asks to install `gsva_hf` when it is missing.

    import evaluate
    from gsva_hf.gres_metric import GRES_METRIC_DIR
    metric = evaluate.load(GRES_METRIC_DIR)                       # GSVA's eval_gres on gRefCOCO
    metric = evaluate.load(GRES_METRIC_DIR, config_name="rela")   # ReLA's official evaluator (480x480)
    metric.compute(predictions=[...], references=[...], pred_rejected=[...], predictions_are_logits=True)
"""

from typing import Any

import datasets
import evaluate
import numpy as np

from gsva_hf.metrics import GresAccumulator

_CONFIGS = {
    "default": {"protocol": "gsva", "refzom": False},
    "gsva": {"protocol": "gsva", "refzom": False},
    "refzom": {"protocol": "gsva", "refzom": True},
    "rela": {"protocol": "rela", "refzom": False},
}

_DESCRIPTION = """\
Generalized referring expression segmentation metrics of GSVA (CVPR 2024). Each example is one expression:
its predicted mask, its GT mask (union of the referred instances; all zero for a no-target expression) and
whether [REJ] (no target) was predicted. Configs: "gsva"/"default" (GSVA's eval_gres on gRefCOCO), "refzom"
(GSVA's eval_gres on RefZOM: wrongly segmented no-target expressions add nothing to the cIoU union) and "rela"
(ReLA's official gRefCOCO evaluator: false positives score IoU 0, masks compared at 480x480, Pr@0.7/0.8/0.9).
Results are fractions; N_acc = TP/(TP+FN) on no-target expressions, T_acc = TN/(TN+FP) on targeted ones.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per expression, an (H, W) mask: binary 0/1, or logits with `predictions_are_logits=True`.
    references: per expression, an (H, W) GT mask with 0 (background), 1 (target), 255 (ignored).
    pred_rejected: per expression, True when [REJ] was predicted.
    predictions_are_logits: threshold predictions (gsva: >= threshold, rela: > threshold, after a bilinear
        resize to 480x480) instead of reading them as 0/1 masks. Default False.
    protocol: "gsva" or "rela"; overrides the config.
    refzom: RefZOM variant of the gsva protocol; overrides the config.
    eval_size: scoring size; "auto" = 480 for rela, original size for gsva; None = original size.
    threshold: logit threshold, default 0.0.
    return_samples: also return the per-expression records under "samples".
Returns:
    giou, ciou, n_acc, t_acc, count, tp, fn, fp, tn, intersection, union (+ pr@0.7, pr@0.8, pr@0.9 for rela).
Example:
    >>> metric = evaluate.load(GRES_METRIC_DIR)
    >>> metric.compute(predictions=[[[1, 0]]], references=[[[1, 0]]], pred_rejected=[False])["giou"]
    0.99999...
"""

_CITATION = """\
@inproceedings{xia2024gsva,
  title={GSVA: Generalized Segmentation via Multimodal Large Language Models},
  author={Xia, Zhuofan and Han, Dongchen and Han, Yizeng and Pan, Xuran and Song, Shiji and Huang, Gao},
  booktitle={CVPR},
  year={2024}
}
@inproceedings{liu2023gres,
  title={GRES: Generalized Referring Expression Segmentation},
  author={Liu, Chang and Ding, Henghui and Jiang, Xudong},
  booktitle={CVPR},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GresMetric(evaluate.Metric):
    """`evaluate` front end of `gsva_hf.metrics.GresAccumulator`."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _CONFIGS:
            raise KeyError(f"config_name must be one of {sorted(_CONFIGS)}, got {self.config_name!r}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
                    "pred_rejected": datasets.Value("bool"),
                }
            ),
            reference_urls=["https://github.com/LeapLabTHU/GSVA", "https://github.com/henghuiding/ReLA"],
        )

    def _compute(
        self,
        predictions: list,
        references: list,
        pred_rejected: list,
        predictions_are_logits: bool = False,
        protocol: str | None = None,
        refzom: bool | None = None,
        eval_size: Any = "auto",
        threshold: float = 0.0,
        return_samples: bool = False,
    ) -> dict:
        settings = dict(_CONFIGS[self.config_name])
        if protocol is not None:
            settings["protocol"] = protocol
            settings["refzom"] = False
        if refzom is not None:
            settings["refzom"] = refzom
        accumulator = GresAccumulator(
            settings["protocol"],
            refzom=settings["refzom"],
            eval_size=tuple(eval_size) if isinstance(eval_size, list) else eval_size,
            threshold=threshold,
            keep_samples=return_samples,
        )
        for index, (pred, gt, rejected) in enumerate(zip(predictions, references, pred_rejected, strict=True)):
            pred_array = np.asarray(pred, dtype=np.float32)
            if not predictions_are_logits:
                if not ((pred_array == 0) | (pred_array == 1)).all():
                    raise ValueError(
                        f"predictions[{index}] holds values other than 0/1; pass predictions_are_logits=True "
                        "to threshold logits"
                    )
                pred_array = pred_array.astype(bool)
            accumulator.add(pred_array, np.asarray(gt, dtype=np.uint8), bool(rejected), sample_id=index)
        result: dict = accumulator.compute()
        if return_samples:
            result["samples"] = accumulator.state_dict()["samples"]
        return result
