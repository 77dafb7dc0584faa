"""Hand-computed checks of gsva_hf.metrics (GSVA's eval_gres / validate, ReLA's evaluator) and its evaluate module.

Every expected number is worked out in the comments from tiny arrays; none is produced by the code under test.
"""

import json
import math

import numpy as np
import pytest
import torch

from gsva_hf.metrics import (
    GresAccumulator,
    RefSegAccumulator,
    binarize,
    resize_gt_mask,
    resize_pred_mask,
    union_instance_masks,
)

EPS_GRES = 1e-8  # eval_gres per-target IoU: I / (U + 1e-8)
EPS_REF = 1e-5  # validate per-target IoU: I / (U + 1e-5)
EPS_CIOU = 1e-10
EPS_COUNT = 1e-5  # AverageMeter.all_reduce: sum / (count + 1e-5)

GT_TOP = np.array([[1, 1], [0, 0]], dtype=np.uint8)  # 2 target pixels
EMPTY = np.zeros((2, 2), dtype=np.uint8)


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# GSVA protocol (eval_gres)
# ---------------------------------------------------------------------------------------------------------------


def test_gsva_empty_gt_rejected_is_tp_with_giou_one_and_no_ciou():
    acc = GresAccumulator()
    # The mask itself is full foreground, but [REJ] on an empty GT is TP: gIoU += 1, I and U untouched.
    r = acc.add(np.full((2, 2), 5.0), EMPTY, pred_rejected=True, sample_id="a")
    assert (r.outcome, r.iou, r.intersection, r.union, r.gt_empty) == ("TP", 1.0, 0, 0, True)
    m = acc.compute()
    assert m["giou"] == approx(1 / (1 + EPS_COUNT))
    assert m["ciou"] == 0.0  # 0 / (0 + 1e-10)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 0, 0, 0)
    assert m["n_acc"] == 1.0  # 1 / (1 + 0)
    assert math.isnan(m["t_acc"])  # no targeted expression: 0 / 0

    # Adding a TN (I=1, U=2) shows the TP added nothing to cIoU: cIoU = 1 / 2.
    acc.add(np.array([[1, 0], [0, 0]], dtype=bool), GT_TOP, False)
    assert acc.compute()["ciou"] == approx(1 / (2 + EPS_CIOU))


def test_gsva_empty_gt_segmented_with_empty_mask_is_fn_scoring_zero():
    acc = GresAccumulator()
    r = acc.add(np.full((2, 2), -1.0), EMPTY, pred_rejected=False)  # nothing predicted, still FN
    assert (r.outcome, r.iou, r.intersection, r.union) == ("FN", 0.0, 0, 0)
    m = acc.compute()
    assert (m["giou"], m["n_acc"], m["fn"]) == (0.0, 0.0, 1)  # 0 / (1 + 1e-5); N_acc = 0 / (0 + 1)


@pytest.mark.parametrize(
    ("refzom", "expected_union", "expected_ciou"),
    [
        # gRefCOCO: FN union = predicted area 3; TN I=1, U=3  ->  cIoU = 1 / (3 + 3)
        (False, 3 + 3, 1 / (6 + EPS_CIOU)),
        # RefZOM: the FN adds nothing  ->  cIoU = 1 / 3
        (True, 3, 1 / (3 + EPS_CIOU)),
    ],
)
def test_gsva_fn_with_predicted_area_grows_union_only_on_grefcoco(refzom, expected_union, expected_ciou):
    acc = GresAccumulator(refzom=refzom)
    fn = acc.add(np.array([[1, 1], [1, 0]], dtype=bool), EMPTY, False)
    assert fn.outcome == "FN" and fn.iou == 0.0
    assert fn.union == (0 if refzom else 3)
    # TN: GT top row, prediction = top-left + bottom-left  ->  I = 1, U = 3
    tn = acc.add(np.array([[1, 0], [1, 0]], dtype=bool), GT_TOP, False)
    assert (tn.outcome, tn.intersection, tn.union) == ("TN", 1, 3)
    m = acc.compute()
    assert m["union"] == expected_union and m["intersection"] == 1
    assert m["ciou"] == approx(expected_ciou)
    # gIoU = (0 + 1/(3 + 1e-8)) / (2 + 1e-5)
    assert m["giou"] == approx((1 / (3 + EPS_GRES)) / (2 + EPS_COUNT))


def test_fp_keeps_mask_iou_in_gsva_but_rela_zeroes_intersection():
    pred = np.array([[1, 0], [0, 0]], dtype=bool)  # against GT_TOP: I = 1, U = 2
    gsva = GresAccumulator("gsva")
    r = gsva.add(pred, GT_TOP, pred_rejected=True)
    assert (r.outcome, r.intersection, r.union) == ("FP", 1, 2)
    assert r.iou == approx(1 / (2 + EPS_GRES))
    m = gsva.compute()
    assert m["ciou"] == approx(1 / (2 + EPS_CIOU))
    assert m["t_acc"] == 0.0  # TN / (TN + FP) = 0 / 1
    assert math.isnan(m["n_acc"])

    rela = GresAccumulator("rela", eval_size=None)
    r = rela.add(pred, GT_TOP, pred_rejected=True)
    assert (r.outcome, r.intersection, r.union, r.iou) == ("FP", 0, 2, 0.0)  # I forced to 0, U kept
    m = rela.compute()
    assert (m["giou"], m["ciou"]) == (0.0, 0.0)  # 0 / 1 and 0 / 2
    assert (m["n_acc"], m["t_acc"]) == (0.0, 0.0)  # no empty sample: both set to 0


def test_tn_iou_and_both_protocols_on_same_sample():
    pred = np.array([[1, 1], [1, 0]], dtype=bool)  # against GT_TOP: I = 2, U = 3
    gsva = GresAccumulator()
    assert gsva.add(pred, GT_TOP, False).iou == approx(2 / (3 + EPS_GRES))
    assert gsva.compute()["t_acc"] == 1.0
    rela = GresAccumulator("rela", eval_size=None)
    assert rela.add(pred, GT_TOP, False).iou == approx(2 / 3)
    assert rela.compute()["giou"] == approx(2 / 3)  # rela: sum / count, no epsilon


def test_multi_instance_target_is_scored_on_union_mask():
    inst_a = np.array([[1, 0, 0], [0, 0, 0]], dtype=np.uint8)
    inst_b = np.array([[0, 0, 255], [0, 0, 1]], dtype=np.uint8)
    inst_c = np.array([[255, 0, 0], [0, 0, 0]], dtype=np.uint8)  # ignore under inst_a's foreground loses
    merged = union_instance_masks([inst_a, inst_b, inst_c])
    np.testing.assert_array_equal(merged, [[1, 0, 255], [0, 0, 1]])
    np.testing.assert_array_equal(union_instance_masks(np.stack([inst_a, inst_b])), [[1, 0, 255], [0, 0, 1]])
    np.testing.assert_array_equal(union_instance_masks([], shape=(2, 3)), np.zeros((2, 3)))
    # Predict instance a plus the ignored pixel (0, 2): that pixel counts nowhere, so I = 1, U = |{(0,0),(1,2)}| = 2.
    pred = np.array([[1, 0, 1], [0, 0, 0]], dtype=bool)
    r = GresAccumulator().add(pred, merged, False)
    assert (r.intersection, r.union) == (1, 2)
    assert r.iou == approx(1 / (2 + EPS_GRES))


def test_ignore_pixels_are_excluded_and_ignore_only_gt_is_empty():
    gt = np.array([[1, 255], [0, 0]], dtype=np.uint8)
    pred = np.array([[1, 1], [1, 0]], dtype=bool)
    # Valid predicted pixels: (0,0), (1,0); I = 1 at (0,0); U = {(0,0), (1,0)} = 2.
    for protocol in ("gsva", "rela"):
        r = GresAccumulator(protocol, eval_size=None).add(pred, gt, False)
        assert (r.intersection, r.union) == (1, 2)
    # A GT with only ignore pixels has no target: [REJ] there is a TP.
    r = GresAccumulator().add(pred, np.array([[255, 0], [0, 0]], dtype=np.uint8), True)
    assert (r.gt_empty, r.outcome) == (True, "TP")


def test_threshold_at_exactly_zero_logits():
    logits = np.array([[0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_array_equal(binarize(logits, inclusive=True), [[1, 1], [0, 1]])
    np.testing.assert_array_equal(binarize(logits, inclusive=False), [[0, 1], [0, 0]])
    # gsva (>= 0): pred {(0,0),(0,1),(1,1)} vs GT_TOP -> I = 2, U = 3
    r = GresAccumulator().add(logits, GT_TOP, False)
    assert (r.intersection, r.union) == (2, 3)
    # rela (> 0): pred {(0,1)} -> I = 1, U = 2
    r = GresAccumulator("rela", eval_size=None).add(logits, GT_TOP, False)
    assert (r.intersection, r.union, r.iou) == (1, 2, 0.5)
    # validate (> 0): I = 1, U = 2 -> 1 / (2 + 1e-5)
    r = RefSegAccumulator().add(logits, GT_TOP)
    assert (r.intersection, r.union) == (1, 2)
    assert r.iou == approx(1 / (2 + EPS_REF))
    # A custom threshold moves the cut: >= 0.5 keeps only (0,1).
    r = GresAccumulator(threshold=0.5).add(logits, GT_TOP, False)
    assert (r.intersection, r.union) == (1, 2)


def test_torch_inputs_are_accepted():
    logits = torch.tensor([[2.0, -1.0], [0.0, -3.0]], dtype=torch.bfloat16)
    gt = torch.tensor([[True, True], [False, False]])
    # >= 0: {(0,0), (1,0)} vs top row -> I = 1, U = 3
    r = GresAccumulator().add(logits, gt, torch.tensor(False))
    assert (r.outcome, r.intersection, r.union) == ("TN", 1, 3)


def _four_sample_set(acc):
    """TP, FN (1 predicted pixel), TN (I=1, U=2), FP (I=4, U=4) on 2x2 masks."""
    acc.add(np.zeros((2, 2), dtype=bool), EMPTY, True, "tp")
    acc.add(np.array([[0, 0], [0, 1]], dtype=bool), EMPTY, False, "fn")
    acc.add(np.array([[1, 0], [0, 0]], dtype=bool), GT_TOP, False, "tn")
    acc.add(np.ones((2, 2), dtype=bool), np.ones((2, 2), dtype=np.uint8), True, "fp")


def test_gsva_aggregate_and_log_line():
    acc = GresAccumulator()
    _four_sample_set(acc)
    m = acc.compute()
    # gIoU = (1 + 0 + 1/(2+1e-8) + 4/(4+1e-8)) / (4 + 1e-5) ~= 2.5 / 4.00001 = 0.62499...
    assert m["giou"] == approx((1 + 0 + 1 / (2 + EPS_GRES) + 4 / (4 + EPS_GRES)) / (4 + EPS_COUNT))
    # cIoU = (0 + 0 + 1 + 4) / (0 + 1 + 2 + 4) = 5 / 7 = 0.714285...
    assert m["ciou"] == approx(5 / (7 + EPS_CIOU))
    assert (m["n_acc"], m["t_acc"]) == (0.5, 0.5)  # 1/(1+1), 1/(1+1)
    assert (m["count"], m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 1, 1, 1, 1)
    assert acc.format_log_line() == "grefcoco giou: 0.6250, ciou: 0.7143, N_acc: 0.5000, T_acc: 0.5000."
    assert acc.format_log_line(epoch=3).startswith("[3] grefcoco giou: 0.6250,")

    refzom = GresAccumulator(refzom=True)
    _four_sample_set(refzom)
    # RefZOM drops the FN's pixel from the union: cIoU = 5 / 6 = 0.8333
    assert refzom.format_log_line() == "refzom giou: 0.6250, ciou: 0.8333, N_acc: 0.5000, T_acc: 0.5000."


def test_log_line_matches_gsva_readme_shape():
    acc = GresAccumulator()
    _four_sample_set(acc)
    line = acc.format_log_line()
    example = "grefcoco giou: 0.6347, ciou: 0.6165, N_acc: 0.5698, T_acc: 0.9954."
    to_shape = str.maketrans("0123456789", "9999999999")
    assert line.translate(to_shape) == example.translate(to_shape)


def test_merge_equals_single_pass_and_state_round_trip(tmp_path):
    single = GresAccumulator()
    _four_sample_set(single)

    first, second = GresAccumulator(), GresAccumulator()
    first.add(np.zeros((2, 2), dtype=bool), EMPTY, True, "tp")
    first.add(np.array([[0, 0], [0, 1]], dtype=bool), EMPTY, False, "fn")
    second.add(np.array([[1, 0], [0, 0]], dtype=bool), GT_TOP, False, "tn")
    second.add(np.ones((2, 2), dtype=bool), np.ones((2, 2), dtype=np.uint8), True, "fp")
    merged = GresAccumulator().merge(first).merge(second.state_dict())
    assert merged.compute() == single.compute()
    assert [s.sample_id for s in merged.samples] == ["tp", "fn", "tn", "fp"]
    assert merged.samples == single.samples

    restored = GresAccumulator.from_state_dict(json.loads(json.dumps(single.state_dict())))
    assert restored.compute() == single.compute()

    with pytest.raises(ValueError, match="different settings"):
        GresAccumulator().merge(GresAccumulator(refzom=True))

    path = tmp_path / "per_sample.json"
    only_tp = GresAccumulator()
    only_tp.add(np.zeros((2, 2), dtype=bool), EMPTY, True, 7)
    only_tp.write_json(path, split="val")
    data = json.loads(path.read_text())
    assert data["metrics"]["t_acc"] is None  # NaN written as null
    assert data["split"] == "val" and data["samples"][0]["sample_id"] == 7
    assert data["samples"][0]["outcome"] == "TP"


# ---------------------------------------------------------------------------------------------------------------
# ReLA protocol
# ---------------------------------------------------------------------------------------------------------------


def test_rela_precision_counts_over_nonempty_samples():
    acc = GresAccumulator("rela", eval_size=None)

    def ones(n: int) -> np.ndarray:
        return np.ones((1, n), dtype=np.uint8)

    acc.add(ones(5).astype(bool), ones(5), False)  # I=5, U=5, IoU 1.0
    acc.add(np.array([[1, 1, 1, 1, 0]], dtype=bool), ones(5), False)  # I=4, U=5, IoU 0.8
    acc.add(np.ones((1, 10), dtype=bool), np.array([[1] * 7 + [0] * 3], dtype=np.uint8), False)  # 7/10 = 0.7
    acc.add(ones(2).astype(bool), ones(2), True)  # FP: I -> 0, U = 2, IoU 0
    m = acc.compute()
    # Pr@0.7 = 3/4 (1.0, 0.8, 0.7), Pr@0.8 = 2/4, Pr@0.9 = 1/4
    assert (m["pr@0.7"], m["pr@0.8"], m["pr@0.9"]) == (0.75, 0.5, 0.25)
    assert m["giou"] == approx((1.0 + 0.8 + 0.7 + 0.0) / 4)
    assert m["ciou"] == approx((5 + 4 + 7 + 0) / (5 + 5 + 10 + 2))  # 16 / 22
    assert (m["n_acc"], m["t_acc"]) == (0.0, 0.0)  # no empty sample in the set
    # With empty samples the accuracies are defined: one TP, one FN -> N_acc 1/2; TN 3, FP 1 -> T_acc 3/4.
    acc.add(np.zeros((1, 2), dtype=bool), np.zeros((1, 2), dtype=np.uint8), True)
    acc.add(np.array([[1, 0]], dtype=bool), np.zeros((1, 2), dtype=np.uint8), False)  # FN, U += 1
    m = acc.compute()
    assert (m["n_acc"], m["t_acc"]) == (0.5, 0.75)
    assert m["ciou"] == approx(16 / 23)
    assert m["pr@0.7"] == 0.75  # still over the 4 non-empty samples
    assert acc.format_log_line().endswith(", Pr@0.7: 0.7500, Pr@0.8: 0.5000, Pr@0.9: 0.2500.")


def test_resize_helpers():
    gt = np.array([[1, 255], [0, 1]], dtype=np.uint8)
    # 2 -> 4: each source pixel covers 2x2 output pixels, labels unchanged.
    np.testing.assert_array_equal(resize_gt_mask(gt, 4), np.kron(gt, np.ones((2, 2), dtype=np.uint8)))
    # 4 -> 2: output centres 0.5*2 = 1 and 1.5*2 = 3 pick source rows/cols 1 and 3.
    big = np.arange(16).reshape(4, 4) % 2
    np.testing.assert_array_equal(resize_gt_mask(big, 2), big[[1, 3]][:, [1, 3]])
    # Bilinear, align_corners=False, 1x2 -> 1x4: source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    # -> clamp(-1), 0.75*-1 + 0.25*1 = -0.5, 0.25*-1 + 0.75*1 = 0.5, clamp(1).
    np.testing.assert_allclose(resize_pred_mask(np.array([[-1.0, 1.0]]), (1, 4)), [[-1.0, -0.5, 0.5, 1.0]])
    np.testing.assert_array_equal(resize_pred_mask(np.array([[True, False]]), (1, 4)), [[1, 1, 0, 0]])


def test_rela_scores_after_resizing_logits_then_thresholding():
    # 1x2 -> 1x4. GT [[1, 1]] -> four target pixels. Logits [[-1, 3]] at source x = -0.25, 0.25, 0.75, 1.25:
    # -1 (clamped), 0.75*-1 + 0.25*3 = 0, 0.25*-1 + 0.75*3 = 2, 3 (clamped). "> 0" keeps 2 pixels: IoU 2/4.
    r = GresAccumulator("rela", eval_size=(1, 4)).add(np.array([[-1.0, 3.0]]), np.ones((1, 2), dtype=np.uint8), False)
    assert (r.intersection, r.union, r.iou) == (2, 4, 0.5)
    # Default rela size is 480x480: a 2x2 mask scales by 240 in each direction, I = 240*240, U = 2*240*240.
    acc = GresAccumulator("rela")
    assert acc.eval_size == (480, 480)
    r = acc.add(np.array([[1, 0], [0, 0]], dtype=bool), GT_TOP, False)
    assert (r.intersection, r.union, r.iou) == (57600, 115200, 0.5)
    # Emptiness comes from the original GT even when resizing loses the target:
    # 1x4 GT [[0, 1, 0, 0]] -> 1x1 samples column floor(0.5 * 4) = 2, which is 0.
    r = GresAccumulator("rela", eval_size=1).add(np.zeros((1, 4), dtype=bool), np.array([[0, 1, 0, 0]]), False)
    assert (r.gt_empty, r.outcome, r.iou) == (False, "TN", 0.0)  # U = 0 -> IoU 0 (ReLA rule)


# ---------------------------------------------------------------------------------------------------------------
# refCOCO / ReasonSeg (validate)
# ---------------------------------------------------------------------------------------------------------------


def test_refseg_empty_union_scores_one_and_aggregates():
    acc = RefSegAccumulator()
    r = acc.add(np.full((2, 2), -1.0), EMPTY, "empty")  # U = 0 -> 0 / (0 + 1e-5) + 1 = 1
    assert (r.intersection, r.union, r.iou) == (0, 0, 1.0)
    # Zero logits are background here (> 0): pred {(0,0),(1,0)} vs GT_TOP -> I = 1, U = 3
    r = acc.add(np.array([[0.5, 0.0], [2.0, -1.0]]), GT_TOP, "partial")
    assert (r.intersection, r.union) == (1, 3)
    m = acc.compute()
    assert m["giou"] == approx((1.0 + 1 / (3 + EPS_REF)) / (2 + EPS_COUNT))  # ~0.666663
    assert m["ciou"] == approx(1 / (3 + EPS_CIOU))
    assert acc.format_log_line("refcoco") == "On refcoco giou: 0.6667, ciou: 0.3333."
    assert acc.format_log_line("refcoco", epoch=1) == "[1] On refcoco giou: 0.6667, ciou: 0.3333."

    first, second = RefSegAccumulator(), RefSegAccumulator()
    first.add(np.full((2, 2), -1.0), EMPTY, "empty")
    second.add(np.array([[0.5, 0.0], [2.0, -1.0]]), GT_TOP, "partial")
    assert first.merge(second).compute() == m
    with pytest.raises(ValueError, match="different settings"):
        RefSegAccumulator("gsva").merge(RefSegAccumulator("lisa"))


def test_reasonseg_ignore_modes():
    gt = np.array([[1, 255], [0, 0]], dtype=np.uint8)
    pred = np.array([[1, 1], [0, 0]], dtype=bool)
    # GSVA: 255 becomes foreground -> GT {(0,0),(0,1)}: I = 2, U = 2
    r = RefSegAccumulator("gsva").add(pred, gt)
    assert (r.intersection, r.union) == (2, 2)
    assert r.iou == approx(2 / (2 + EPS_REF))
    # LISA: (0,1) is ignored -> I = 1, U = 1
    r = RefSegAccumulator("lisa").add(pred, gt)
    assert (r.intersection, r.union) == (1, 1)
    assert r.iou == approx(1 / (1 + EPS_REF))
    # Prediction only on ignored pixels of an otherwise empty GT: LISA U = 0 -> IoU 1; GSVA I = U = 1.
    gt_ignore = np.array([[255, 0]], dtype=np.uint8)
    pred_ignore = np.array([[True, False]])
    assert RefSegAccumulator("lisa").add(pred_ignore, gt_ignore).iou == 1.0
    assert RefSegAccumulator("gsva").add(pred_ignore, gt_ignore).iou == approx(1 / (1 + EPS_REF))


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_clear_errors():
    acc = GresAccumulator()
    with pytest.raises(ValueError, match=r"pred_mask has shape \(2, 3\) but gt_mask has shape \(2, 2\)"):
        acc.add(np.zeros((2, 3), dtype=bool), EMPTY, False)
    with pytest.raises(ValueError, match=r"gt_mask must hold only 0 .* found values \[2\]"):
        acc.add(np.zeros((2, 2), dtype=bool), np.array([[2, 0], [0, 0]]), False)
    with pytest.raises(ValueError, match="gt_mask must be a 2-D"):
        acc.add(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)), False)
    with pytest.raises(ValueError, match="pred_mask is an integer array"):
        acc.add(np.array([[3, 0], [0, 0]]), EMPTY, False)
    with pytest.raises(ValueError, match="pred_rejected must be a bool"):
        acc.add(np.zeros((2, 2), dtype=bool), EMPTY, "yes")
    with pytest.raises(ValueError, match="gt_masks has 1 entries but pred_masks has 2"):
        acc.add_batch(np.zeros((2, 2, 2), dtype=bool), np.zeros((1, 2, 2)), [False, False])
    with pytest.raises(ValueError, match="protocol must be 'gsva' or 'rela'"):
        GresAccumulator("lisa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refzom=True only exists"):
        GresAccumulator("rela", refzom=True)
    with pytest.raises(ValueError, match="ignore_mode must be"):
        RefSegAccumulator("none")  # type: ignore[arg-type]
    assert len(acc) == 0  # failed adds leave no trace


# ---------------------------------------------------------------------------------------------------------------
# evaluate module
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_module_matches_accumulator_and_hand_values():
    evaluate = pytest.importorskip("evaluate")
    from gsva_hf.gres_metric import GRES_METRIC_DIR

    preds = [np.zeros((2, 2)), np.array([[0, 0], [0, 1]]), np.array([[1, 0], [0, 0]]), np.ones((2, 2))]
    refs = [EMPTY, EMPTY, GT_TOP, np.ones((2, 2), dtype=np.uint8)]
    rejected = [True, False, False, True]  # the four-sample set: TP, FN, TN, FP

    metric = evaluate.load(GRES_METRIC_DIR)
    out = metric.compute(predictions=preds, references=refs, pred_rejected=rejected)
    acc = GresAccumulator()
    _four_sample_set(acc)
    assert out == acc.compute()
    assert out["ciou"] == approx(5 / (7 + EPS_CIOU)) and (out["n_acc"], out["t_acc"]) == (0.5, 0.5)

    refzom = evaluate.load(GRES_METRIC_DIR, config_name="refzom")
    out = refzom.compute(predictions=preds, references=refs, pred_rejected=rejected)
    assert out["ciou"] == approx(5 / (6 + EPS_CIOU))

    rela = evaluate.load(GRES_METRIC_DIR, config_name="rela")
    out = rela.compute(
        predictions=[np.array([[1.0, -1.0], [-2.0, 0.0]])],
        references=[GT_TOP],
        pred_rejected=[False],
        predictions_are_logits=True,
        eval_size=None,
        return_samples=True,
    )
    # > 0 keeps (0,0) only: I = 1, U = 2
    assert (out["giou"], out["intersection"], out["union"]) == (0.5, 1, 2)
    assert out["samples"][0]["outcome"] == "TN"
    with pytest.raises(ValueError, match=r"predictions\[0\] holds values other than 0/1"):
        metric.compute(predictions=[np.full((2, 2), 0.3)], references=[EMPTY], pred_rejected=[False])


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, bool])
def test_intersection_and_union_equal_plain_counts_for_every_gt_dtype(dtype):
    """The no-copy paths (0/1 uint8, bool) and the general one count like the set definitions, 255 left out."""
    from gsva_hf.metrics import check_gt_mask, intersection_and_union

    rng = np.random.default_rng(4)
    pred = rng.random((37, 23)) > 0.5
    labels = rng.choice([0, 1, 255] if dtype is not bool else [0, 1], size=(37, 23))
    gt = check_gt_mask(labels.astype(dtype))
    assert gt.dtype == np.uint8
    counted = labels != 255
    inter = sum(1 for p, g, c in zip(pred.flat, labels.flat, counted.flat) if c and p and g == 1)
    union = sum(1 for p, g, c in zip(pred.flat, labels.flat, counted.flat) if c and (p or g == 1))
    assert intersection_and_union(pred, gt) == (inter, union)


@pytest.mark.parametrize(
    "make", [lambda: GresAccumulator(), lambda: GresAccumulator("rela", eval_size=6), lambda: RefSegAccumulator()]
)
def test_scored_form_scores_like_the_logits(make):
    """What evaluation hands over (a bool mask, or the logits for ReLA) gives the sums the logits give."""
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.choice([-1.0, 0.0, 0.5], size=(2, 9, 7)).astype(np.float32))  # exact zeros
    gts = [rng.integers(0, 2, (9, 7)).astype(np.uint8), np.zeros((9, 7), np.uint8)]
    direct, handed = make(), make()
    for pred, gt in zip(logits, gts):
        flag = () if isinstance(direct, RefSegAccumulator) else (False,)
        direct.add(pred, gt, *flag)
        handed.add(make().scored_form(pred), gt, *flag)
    assert handed.sums == direct.sums
    assert make().scored_form(logits).dtype == (torch.float32 if getattr(direct, "eval_size", None) else torch.bool)
