"""The tiny example: the vision stage's labels agree with the pixels and the stage trains only CLIP and the
projector; train_tiny.py's from-scratch options do what they say, are refused where their result would be lost, and
with all of them off it trains exactly like train_hf.py; the probes and the diagnosis measure what they claim."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from examples.tiny_synthetic.from_scratch import TimedEvaluationCallback, draw_language_model
from examples.tiny_synthetic.train_tiny import TinyArguments, build_tiny_run, ensure_synthetic_data
from examples.tiny_synthetic.vision_pretraining import (
    TARGETS,
    ImageAndPatchLabels,
    ImageContentLabels,
    PatchContentLabels,
    patch_grid,
    train_vision_features,
)
from gsva_hf.data.synthetic import IMAGE_SUBDIR, PALETTE, read_image_contents, write_synthetic_grefcoco
from tests.conftest import REPO
from tests.data.test_synthetic import scene, tree  # noqa: F401, F811  (fixtures)
from tests.training.test_training import check_learning_rate_groups, run_args

EXAMPLE = REPO / "examples" / "tiny_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 24, "val": 6, "testA": 0, "testB": 0}, seed=4)
    return root


def pixel_contents(root, split: str) -> dict[int, set]:
    """(colour, shape) pairs of each image: colour = palette entry nearest the mean pixel under each polygon mask."""
    instances = json.loads((root / "refer_seg" / "grefcoco" / "instances.json").read_text())
    shapes = {c["id"]: c["name"] for c in instances["categories"]}
    images = {i["id"]: i for i in instances["images"]}
    split_ids = {i["id"] for i in json.loads((root / "synthetic_labels.json").read_text())["images"] if i["split"] == split}
    names, palette = list(PALETTE), np.array(list(PALETTE.values()), dtype=float)
    found: dict[int, set] = {}
    for ann in instances["annotations"]:
        if ann["image_id"] not in split_ids:
            continue
        info = images[ann["image_id"]]
        pixels = np.asarray(Image.open(root / IMAGE_SUBDIR / info["file_name"]).convert("RGB"), dtype=float)
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], info["height"], info["width"]))
        mean = pixels[mask_utils.decode(rle).astype(bool)].mean(0)
        colour = names[int(np.abs(palette - mean).sum(1).argmin())]
        found.setdefault(ann["image_id"], set()).add((colour, shapes[ann["category_id"]]))
    return found


@pytest.mark.parametrize("split", ["train", "val"])
def test_image_contents_agree_with_the_pixels(synthetic, split):
    records, contents = read_image_contents(synthetic, split)
    expected = pixel_contents(synthetic, split)
    assert {r["id"] for r in records} == set(expected)
    assert {i: contents[i] for i in expected} == expected
    labels = ImageContentLabels(synthetic, split)
    assert len(labels) == len(records) and len(labels.pairs) == 24
    for record, row in zip(records, labels.targets):
        assert {pair for pair, on in zip(labels.pairs, row.tolist()) if on} == expected[record["id"]]


def test_patch_labels_agree_with_the_pixels(synthetic):
    """Per 16-px patch: the labelled colour is the palette colour painted on most of the patch (when it covers at
    least 20%), and its shape is one that colour takes in the image; elsewhere the label is background."""
    records, contents = read_image_contents(synthetic, "val")
    labels = PatchContentLabels(synthetic, "val", grid=8)
    assert len(labels) == len(records) and labels.targets.shape == (len(records), 64)
    names, palette = list(PALETTE), np.array(list(PALETTE.values()), dtype=float)
    checked = 0
    for record, pixels, row in zip(records, labels.images, labels.targets.tolist()):
        distance = np.abs(pixels[..., None, :].astype(float) - palette).sum(-1)
        painted = np.where(distance.min(-1) < 60, distance.argmin(-1), -1)
        patches = painted.reshape(8, 16, 8, 16).transpose(0, 2, 1, 3).reshape(64, 256)
        for patch, label in zip(patches, row):
            shares = np.bincount(patch[patch >= 0], minlength=len(names)) / 256
            if np.any(np.abs(shares - 0.2) < 1 / 256):
                continue
            checked += 1
            if shares.max() < 0.2:
                assert label == labels.background
            else:
                colour, shape = labels.pairs[label]
                assert colour == names[int(shares.argmax())]
                assert (colour, shape) in contents[record["id"]]
    assert checked > 300 and (labels.targets != labels.background).sum() > 20


def test_missing_labels_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthetic_labels.json"):
        read_image_contents(tmp_path, "train")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_only_the_vision_side_trains_and_the_loss_falls(tiny_model, tiny_processor, synthetic, target):
    for parameter in tiny_model.parameters():
        parameter.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    train, val = (TARGETS[target](synthetic, split, tiny_model) for split in ("train", "val"))
    rows = train_vision_features(
        tiny_model, tiny_processor.image_processor, train, val, steps=40, batch_size=8, learning_rate=3e-3, eval_every=20
    )
    assert [r["step"] for r in rows] == [1, 20, 40]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    kinds = {"image": {"val_recall", "val_specificity"}, "patches": {
        "val_object_accuracy", "val_colour_accuracy", "val_shape_accuracy", "val_background_accuracy"}}  # fmt: skip
    scores = kinds[target] if target in kinds else kinds["image"] | kinds["patches"]
    assert all(set(r) == {"step", "seconds", "loss", *scores} and all(0 <= r[k] <= 1 for k in scores) for r in rows)
    changed = {name for name, p in tiny_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= {name for name in before if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    assert {"model.vision_tower.embeddings.patch_embedding.weight", "model.multi_modal_projector.linear_1.weight"} <= changed
    assert not any(p.requires_grad for p in tiny_model.parameters()), "requires_grad flags were not restored"
    assert not tiny_model.vision_tower.training, "the tower's eval mode was not restored"


def test_a_linear_probe_leaves_the_model_as_it_is(tiny_model, tiny_processor, synthetic):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    labels = PatchContentLabels(synthetic, "train", patch_grid(tiny_model))
    rows = train_vision_features(
        tiny_model, tiny_processor.image_processor, labels, labels, steps=60, batch_size=8, learning_rate=3e-2, eval_every=60,
        train_tower=False,
    )
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert all(torch.equal(p, before[name]) for name, p in tiny_model.named_parameters())
    assert all(p.grad is None for p in tiny_model.parameters()) and not tiny_model.vision_tower.training
    with pytest.raises(ValueError, match="one kind"):
        train_vision_features(tiny_model, tiny_processor.image_processor, labels, ImageContentLabels(synthetic, "val"), 1)


def test_labels_outside_the_manifest_are_refused(synthetic, tmp_path):
    import shutil

    root = shutil.copytree(synthetic, tmp_path / "copy")
    manifest = json.loads((root / "synthetic_grefcoco.json").read_text())
    used = {o["color"] for o in json.loads((root / "synthetic_labels.json").read_text())["annotations"]}
    manifest["parameters"]["colors"] = {c: v for c, v in manifest["parameters"]["colors"].items() if c != sorted(used)[0]}
    (root / "synthetic_grefcoco.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="colour\\+shape not in .*synthetic_grefcoco.json"):
        ImageContentLabels(root, "train")
    (root / "synthetic_grefcoco.json").unlink()
    with pytest.raises(FileNotFoundError, match="synthetic_grefcoco.json not found"):
        PatchContentLabels(root, "val", grid=8)


def test_patch_scores_count_colour_and_shape_apart(synthetic):
    """Scores of hand-made predictions: the truth scores 1; a colour swapped on k object patches costs k/n of the
    object and colour accuracies but no shape accuracy; calling one background patch an object costs 1/m."""
    labels = PatchContentLabels(synthetic, "val", grid=8)
    truth = torch.nn.functional.one_hot(labels.targets, labels.background + 1).float()
    assert set(labels.scores(truth).values()) == {1.0}
    on_object = (labels.targets != labels.background).nonzero().tolist()
    background = (labels.targets == labels.background).nonzero().tolist()
    said, k = truth.clone(), 3
    for image, patch in on_object[:k]:
        colour, shape = labels.pairs[labels.targets[image, patch]]
        other = next(i for i, (c, s) in enumerate(labels.pairs) if s == shape and c != colour)
        said[image, patch] = torch.nn.functional.one_hot(torch.tensor(other), labels.background + 1)
    image, patch = background[0]
    said[image, patch] = torch.nn.functional.one_hot(labels.targets[on_object[-1][0], on_object[-1][1]], labels.background + 1)
    scores = labels.scores(said)
    n, m = len(on_object), len(background)
    assert scores["val_object_accuracy"] == pytest.approx(1 - k / n)
    assert scores["val_colour_accuracy"] == pytest.approx(1 - k / n)
    assert scores["val_shape_accuracy"] == 1.0
    assert scores["val_background_accuracy"] == pytest.approx(1 - 1 / m)


def test_both_kinds_together_add_the_two_losses_and_keep_both_scores(synthetic):
    both = ImageAndPatchLabels(synthetic, "val", grid=8)
    image, patches = ImageContentLabels(synthetic, "val"), PatchContentLabels(synthetic, "val", grid=8)
    assert both.pairs == image.pairs and len(both) == len(image)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(len(both), len(both.pairs), generator=generator),
              torch.randn(len(both), 64, patches.background + 1, generator=generator))  # fmt: skip
    expected = image.loss(logits[0], image.targets) + patches.loss(logits[1], patches.targets)
    torch.testing.assert_close(both.loss(logits, both.targets), expected)
    assert both.scores(logits) == {**image.scores(logits[0]), **patches.scores(logits[1])}


def test_labels_on_another_grid_are_refused(tiny_model, tiny_processor, synthetic):
    labels = PatchContentLabels(synthetic, "val", grid=patch_grid(tiny_model) // 2)
    with pytest.raises(ValueError, match="image tokens but the labels have"):
        train_vision_features(tiny_model, tiny_processor.image_processor, labels, labels, steps=1, batch_size=2)


def test_train_tiny_runs_the_stage_and_counts_its_time(synthetic, tmp_path):
    args = run_args(
        synthetic, tmp_path / "run", "--max_steps", "1", "--vision_pretrain_steps", "3",
        "--vision_pretrain_batch_size", "4", "--val_dataset", "grefcoco|unc|val", "--eval_at_minutes", "30",
        "--lora_r", "-1",
        "--config_overrides", "vision_feature_layer=-1,text_config.num_attention_heads=8,text_config.num_key_value_heads=8",
    )  # fmt: skip
    run = build_tiny_run(args)
    config = run.trainer.model.config
    assert (config.vision_feature_layer, config.text_config.num_attention_heads) == (-1, 8)
    report = json.loads((tmp_path / "run" / "vision_pretraining.json").read_text())
    assert report["steps"] == 3 and report["batch_size"] == 4 and report["seconds"] > 0 and report["target"] == "image"
    assert 0 <= report["val_recall"] <= 1
    (curve,) = [c for c in run.trainer.callback_handler.callbacks if isinstance(c, TimedEvaluationCallback)]
    assert curve.training_seconds == pytest.approx(report["seconds"])
    passed = TimedEvaluationCallback([0.1, 0.5, 30], evaluate=None, curve_path=tmp_path / "c.jsonl", start_seconds=12)
    assert passed.marks == [0.5, 30], "a mark the stage already passed must be dropped, not evaluated at step 1"


@pytest.mark.parametrize("stop_after_last, save_strategy", [(False, "steps"), (True, "steps"), (True, "no")])
def test_each_curve_mark_saves_a_checkpoint_and_the_last_can_stop_training(tmp_path, stop_after_last, save_strategy):
    """Every row of the curve names the checkpoint saved at its step (none when saving is off); with
    `stop_after_last` training ends at the last mark, and the end of training does not evaluate the same step twice."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    calls = []
    curve = TimedEvaluationCallback(
        [0.1, 0.2], evaluate=lambda net: calls.append(1) or {"giou": 0.5}, curve_path=tmp_path / "c.jsonl",
        start_seconds=5.0, stop_after_last=stop_after_last,
    )  # fmt: skip
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, world_size=1, save_strategy=save_strategy)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    model = torch.nn.Linear(1, 1)
    rows = []
    for step, seconds in ((1, 2.0), (2, 6.0)):
        control = TrainerControl()
        state.global_step = step
        curve.on_step_begin(args, state, control)
        curve.training_seconds += seconds
        curve.on_step_end(args, state, control, model=model)
        rows.append((control.should_save, control.should_training_stop))
    saves = save_strategy != "no"
    assert rows == [(saves, False), (saves, stop_after_last)]
    curve.on_train_end(args, state, TrainerControl(), model=model)
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(r["minutes"], r["step"], r["checkpoint"], r["final"]) for r in lines] == [
        (0.1, 1, "checkpoint-1" if saves else None, False), (0.2, 2, "checkpoint-2" if saves else None, False),
    ]  # fmt: skip
    assert len(calls) == 2 and model.training


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give --eval_at_minutes"),
        (["--eval_at_minutes", "5", "--val_dataset", ""], "needs --val_dataset"),
        (["--eval_at_minutes", "0.5", "--val_dataset", "grefcoco|unc|val", "--clock_offset_seconds", "60"], "already passed"),
    ],
)
def test_stop_at_last_minute_is_refused_where_no_mark_would_stop_the_run(synthetic, tmp_path, extra, message):
    args = run_args(synthetic, tmp_path / "run", "--max_steps", "1", "--stop_at_last_minute", "true", "--lora_r", "-1", *extra)
    with pytest.raises(ValueError, match=message):
        build_tiny_run(args)


def test_train_tiny_runs_the_patch_stage_and_refuses_unknown_targets(synthetic, tmp_path):
    common = ["--max_steps", "1", "--vision_pretrain_steps", "2", "--vision_pretrain_batch_size", "2", "--lora_r", "-1"]
    build_tiny_run(run_args(synthetic, tmp_path / "run", *common, "--vision_pretrain_target", "patches"))
    report = json.loads((tmp_path / "run" / "vision_pretraining.json").read_text())
    assert report["target"] == "patches" and 0 <= report["val_object_accuracy"] <= 1
    with pytest.raises(ValueError, match="--vision_pretrain_target must be one of"):
        build_tiny_run(run_args(synthetic, tmp_path / "run2", *common, "--vision_pretrain_target", "pixels"))
    with pytest.raises(ValueError, match="only applies with --vision_pretrain_steps > 0"):
        build_tiny_run(run_args(synthetic, tmp_path / "run3", "--max_steps", "1", "--vision_pretrain_target", "patches"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [("vision_feature_layer", "expected key=value"), ("text_config.no_such=1", "no settable 'no_such'"),
     ("out_dim.x=1", "not a sub-config"), ("vision_feature_layer=1.5", "vision_feature_layer=1.5"),
     ("a=b=c", "expected key=value"), ("out_dim=128", "invalid GSVA config")],
)  # fmt: skip
def test_bad_config_overrides_name_the_key(synthetic, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_run(run_args(synthetic, tmp_path / "run", "--max_steps", "1", "--config_overrides", overrides))


def test_config_overrides_reach_nested_configs(synthetic, tmp_path):
    overrides = " sam_config.mask_decoder_config.num_hidden_layers = 1 , vision_config.num_hidden_layers=3,text_config.attention_bias=true"
    run = build_tiny_run(run_args(synthetic, tmp_path / "run", "--max_steps", "1", "--config_overrides", overrides))
    model = run.trainer.model
    assert len(model.sam.mask_decoder.transformer.layers) == 1 and len(model.vision_tower.encoder.layers) == 3
    assert model.language_model.layers[0].self_attn.q_proj.bias is not None


def test_embedding_init_std_draws_only_the_input_embeddings(synthetic, tmp_path):
    def build(*extra):
        return build_tiny_run(run_args(synthetic, tmp_path / "run", "--max_steps", "1", "--lora_r", "-1", *extra)).trainer.model

    plain, drawn = build(), build("--embedding_init_std", "1.0")
    embeddings = drawn.get_input_embeddings().weight
    assert embeddings.std().item() == pytest.approx(1.0, rel=0.05)
    assert plain.get_input_embeddings().weight.std().item() == pytest.approx(plain.config.text_config.initializer_range, rel=0.1)
    others = dict(plain.named_parameters())
    for name, parameter in drawn.named_parameters():
        if "embed_tokens" not in name:
            assert torch.equal(parameter, others[name]), name
    for bad in ("0", "nan", "inf"):
        with pytest.raises(ValueError, match="--embedding_init_std must be a positive finite number"):
            build("--embedding_init_std", bad)


def test_lm_init_std_redraws_only_the_named_language_model_layers(synthetic, tmp_path):
    def build(*extra):
        return build_tiny_run(run_args(synthetic, tmp_path / "run", "--max_steps", "1", "--lora_r", "-1", *extra)).trainer.model

    plain = dict(build().named_parameters())
    drawn = dict(build("--lm_init_std", "0.5", "--lm_init_modules", "q_proj,o_proj").named_parameters())
    changed = {name for name in plain if not torch.equal(plain[name], drawn[name])}
    layers = build().config.text_config.num_hidden_layers
    assert changed == {f"model.language_model.layers.{i}.self_attn.{m}.weight" for i in range(layers) for m in ("q_proj", "o_proj")}
    assert torch.cat([drawn[name].flatten() for name in changed]).std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match=r"--lm_init_modules: no language-model layer ends with \['qkv'\]"):
        build("--lm_init_std", "0.5", "--lm_init_modules", "qkv")


REFUSALS = {  # case: (start from a folder with weights, extra arguments, expected message)
    "weights": (True, ["--vision_pretrain_steps", "2"], "holds weights"),
    "overrides": (True, ["--config_overrides", "vision_feature_layer=-1"], "--config_overrides applies to presets without"),
    "embedding": (True, ["--embedding_init_std", "1.0"], "--embedding_init_std applies to presets without weights"),
    "lm init": (True, ["--lm_init_std", "0.088"], "--lm_init_std applies to presets without weights"),
    "lm modules alone": (False, ["--lm_init_modules", "q_proj"], "--lm_init_modules only applies with --lm_init_std"),
    "lm bad std": (False, ["--lm_init_std", "-1"], "--lm_init_std must be a positive finite number"),
    "boost without steps": (False, ["--mask_loss_boost", "4"], r"--mask_loss_boost 4.0 needs --mask_loss_boost_steps > 0"),
    "boost not positive": (False, ["--mask_loss_boost", "0", "--mask_loss_boost_steps", "2"], "positive finite"),
    "lora": (False, ["--vision_pretrain_steps", "2", "--lora_r", "8", "--train_vision_tower", "true"], "--train_projector true"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_from_scratch_options_are_refused_where_their_result_would_be_lost(
    synthetic, tmp_path, tiny_model, tiny_processor, case
):
    with_weights, extra, message = REFUSALS[case]
    if with_weights:
        tiny_model.save_pretrained(tmp_path / "model")
        tiny_processor.save_pretrained(tmp_path / "model")
        extra = [*extra, "--model_name_or_path", str(tmp_path / "model")]
    with pytest.raises(ValueError, match=message):
        build_tiny_run(run_args(synthetic, tmp_path / "run", "--max_steps", "1", *extra))


def test_probe_redraws_only_the_language_model_at_the_asked_scale(tiny_model):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    draw_language_model(tiny_model, 0.5, generator=torch.Generator().manual_seed(1), flag="--lm-init-std")
    changed = {name for name, p in tiny_model.named_parameters() if not torch.equal(p, before[name])}
    drawn = {f"model.language_model.{n}.weight" for n, m in tiny_model.language_model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))} | {"lm_head.weight"}  # fmt: skip
    assert changed == drawn
    weights = torch.cat([dict(tiny_model.named_parameters())[name].flatten() for name in drawn])
    assert weights.std().item() == pytest.approx(0.5, rel=0.02)
    with pytest.raises(ValueError, match="--lm-init-std must be a positive finite number"):
        draw_language_model(tiny_model, float("nan"), flag="--lm-init-std")


def test_probe_redraw_limited_to_named_layers(tiny_model):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    draw_language_model(tiny_model, 0.5, ("q_proj", "k_proj"))
    changed = {name for name, p in tiny_model.named_parameters() if not torch.equal(p, before[name])}
    layers = tiny_model.config.text_config.num_hidden_layers
    assert changed == {f"model.language_model.layers.{i}.self_attn.{m}.weight" for i in range(layers) for m in ("q_proj", "k_proj")}
    with pytest.raises(ValueError, match=r"--lm_init_modules: no language-model layer ends with \['qproj'\]"):
        draw_language_model(tiny_model, 0.5, ("qproj",))


def test_variance_shares_on_hand_made_features(tiny_model, tiny_processor, synthetic):
    """Between-group share of variance: 0,2,4,6 split {0,2}|{4,6} has means 1 and 5 around 3, so 16 of 20."""
    from examples.tiny_synthetic.probe_vision_features import token_variance_shares, variance_shares

    features = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 1.0]])
    shares = variance_shares(features, {"halves": torch.tensor([0, 0, 1, 1]), "each": torch.arange(4)})
    assert shares == {"halves": pytest.approx(0.8), "each": pytest.approx(1.0)}
    measured = token_variance_shares(tiny_model, tiny_processor.image_processor, synthetic)
    assert set(measured) == {"colour", "shape", "pair"}
    assert 0 <= measured["colour"] <= measured["pair"] <= 1 and measured["shape"] <= measured["pair"]


def test_the_embedded_default_config_trains_what_it_says(synthetic, tmp_path):
    """config.json as shipped, cut to a few steps: the LM is drawn at 0.088 and trains
    whole; the tower and projector get the `both` stage, then stay frozen (unchanged by GRES steps) while SAM trains;
    the learning-rate groups are 1e-3 and 3e-4 for SAM and the fcs."""
    from gsva_hf.training import is_mask_head

    args = [
        str(EXAMPLE / "config.json"), "--dataset_dir", str(synthetic), "--make_synthetic_data",
        "false", "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--vision_pretrain_steps", "2",
        "--vision_pretrain_batch_size", "4", "--per_device_train_batch_size", "4", "--val_dataset", "",
        "--save_strategy", "no", "--eval_at_minutes", "", "--torch_threads", "1",
    ]  # fmt: skip
    run = build_tiny_run(args)
    model = run.trainer.model
    assert json.loads((tmp_path / "run" / "vision_pretraining.json").read_text())["target"] == "both"
    q_proj = model.language_model.layers[0].self_attn.q_proj.weight
    assert q_proj.std().item() == pytest.approx(0.088, rel=0.05)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("model.vision_tower", "model.multi_modal_projector"))}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.language_model"))
    rates = {group["lr"] for group in run.trainer.create_optimizer().param_groups}
    assert rates == {1e-3, 3e-4}
    before_sam = {n: p.detach().clone() for n, p in model.named_parameters() if is_mask_head(n)}
    run.trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert any(not torch.equal(after[n], p) for n, p in before_sam.items())


def test_diagnosis_agrees_with_the_evaluator(tmp_path):
    """The per-kind diagnosis counts a slot right exactly when GSVA's evaluator does (bundled model, fresh val), masks
    every present target, and probes the single-object states; a negative or doubled train count is refused."""
    from examples.tiny_synthetic.diagnose_synthetic import diagnose
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset
    from gsva_hf.segment import DEFAULT_MODEL as BUNDLED_MODEL
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    write_synthetic_grefcoco(tmp_path, num_images={"train": 0, "val": 12, "testA": 0, "testB": 0}, seed=11)
    report = diagnose(BUNDLED_MODEL, tmp_path, "val", batch_size=5, probe_train_images=0)
    model = GSVAForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    result = evaluate_dataset(
        model, GSVAProcessor.from_pretrained(BUNDLED_MODEL), build_val_dataset(tmp_path, "grefcoco|unc|val"), progress=False
    )
    sums = result.metrics
    assert report["slots"] == sums["count"]
    assert report["decision_accuracy"] == pytest.approx((sums["tp"] + sums["tn"]) / sums["count"], abs=1e-12)
    assert sum(k["count"] for k in report["per_kind_accuracy"].values()) == report["slots"]
    assert -1.0 <= report["correlation_right_vs_other_image"] <= 1.0
    assert report["per_kind_masks"]["all"]["count"] == sums["tn"] + sums["fp"]  # GSVA's positives are absent targets
    assert report["slot_state_probe"]["single_slots"] > 0
    with pytest.raises(ValueError, match="probe_train_images must be >= 0"):
        diagnose(BUNDLED_MODEL, tmp_path, "val", batch_size=5, probe_train_images=-1)
    with pytest.raises(ValueError, match="count the train images twice"):
        diagnose(BUNDLED_MODEL, tmp_path, "train", batch_size=5)


def test_the_diagnosis_masks_are_the_evaluators_masks(tmp_path):
    """Every present target's (intersection, union) in the diagnosis is the one GSVA's evaluator adds for it, slot by
    slot, re-evaluation pass included (this val split has present targets after a `[REJ]`)."""
    from examples.tiny_synthetic.diagnose_synthetic import slot_overlaps
    from gsva_hf.data.collator import GSVACollator
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset
    from gsva_hf.segment import DEFAULT_MODEL as BUNDLED_MODEL
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    write_synthetic_grefcoco(tmp_path, num_images={"train": 0, "val": 10, "testA": 0, "testB": 0}, seed=5)
    model = GSVAForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    processor = GSVAProcessor.from_pretrained(BUNDLED_MODEL)
    dataset = build_val_dataset(tmp_path, "grefcoco|unc|val")
    items = [dataset[i] for i in range(len(dataset))]
    assert any(not s.rejected[i] and any(s.rejected[:i]) for s in items for i in range(len(s.rejected)))
    with torch.no_grad():
        overlaps = slot_overlaps(model, GSVACollator(processor)(items))
    ids = [f"{index}:{slot}" for index, s in enumerate(items) for slot in range(len(s.rejected))]
    assert [o is None for o in overlaps] == [r for s in items for r in s.rejected]
    added = {r.sample_id: (r.intersection, r.union) for r in evaluate_dataset(model, processor, dataset, progress=False).accumulator.samples}
    present = {i: o for i, o in zip(ids, overlaps) if o is not None}
    assert present == {i: added[i] for i in present} and len(present) > 0


def test_mask_quality_colour_and_shape_and_the_ridge_probe():
    """Hand-made overlaps give each kind's cIoU and mean IoU; phrases of single objects name their pair and no
    other phrase does; the ridge probe reads labels that a direction carries and not labels drawn apart from it."""
    from examples.tiny_synthetic.diagnose_synthetic import colour_and_shape, mask_quality, ridge_probe_accuracy
    from gsva_hf.data.synthetic import ALL_SHAPES

    quality = mask_quality([(3, 4), None, (1, 4), (0, 2)], ["single", "absent (colour)", "single", "multi"])
    assert quality["single"] == {"count": 2, "ciou": 4 / 8, "miou": (3 / 4 + 1 / 4) / 2}
    assert quality["all"] == {"count": 3, "ciou": 4 / 10, "miou": (3 / 4 + 1 / 4 + 0) / 3}
    assert "absent (colour)" not in quality
    assert colour_and_shape("the red circles") == (list(PALETTE).index("red"), ALL_SHAPES.index("circle"))
    assert colour_and_shape("The blue star") == (list(PALETTE).index("blue"), ALL_SHAPES.index("star"))
    assert colour_and_shape("the circle") is None and colour_and_shape("the red shape") is None
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centres = 3.0 * torch.randn(4, 16, generator=generator)
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    assert ridge_probe_accuracy(features, labels) > 0.95
    unrelated = torch.randint(0, 4, (400,), generator=generator)
    assert ridge_probe_accuracy(features, unrelated) < 0.4


def test_ranking_and_best_shift_on_hand_made_margins():
    """Present 3, 1, 0 against absent 2, -1: 4 of 6 pairs ranked right (1 and 0 fall below 2). The best cut lies in
    (-1, 0] and gets 4 of 5 slots right (only the absent 2 stays wrong); a brute-force sweep of cuts agrees."""
    from examples.tiny_synthetic.diagnose_synthetic import ranking_and_best_shift

    margins = torch.tensor([3.0, 1.0, 0.0, 2.0, -1.0])
    present = torch.tensor([True, True, True, False, False])
    result = ranking_and_best_shift(margins, present)
    assert result["auc"] == pytest.approx(4 / 6)
    brute = max(((margins >= c) == present).float().mean().item() for c in torch.linspace(-3, 5, 801))
    assert result["accuracy_at_best_shift"] == pytest.approx(brute)
    shifted = ((margins + result["best_shift"]) >= 0) == present
    assert shifted.float().mean().item() == pytest.approx(brute)
    tied = ranking_and_best_shift(torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert tied["auc"] == pytest.approx(0.5)


@pytest.mark.parametrize(("mode", "answer_form"), [("color", "short"), ("shape", "short"), ("scene-text", "named")])
def test_presence_questions_answer_from_the_scene(tree, scene, mode, answer_form):  # noqa: F811
    """The presence probe's yes/no answers agree with the colours read from the pixels; shape negatives are hard;
    the scene-text mode lists exactly the scene's objects; the named answer repeats the asked target."""
    import re

    from examples.tiny_synthetic.probe_presence_learning import PresenceQuestions

    root = tree[0]
    questions = PresenceQuestions(root, "val", mode, answer_form)
    rng = np.random.default_rng(0)
    answers = Counter()
    for _ in range(200):
        sample = questions.draw(rng)
        question, answer = sample.rounds[0]
        present = {(o["color"], o["shape"]) for o in scene[sample.meta["image_id"]][1]}
        if mode == "color":
            color = re.fullmatch(r"Is there (\w+) in this image\?", question).group(1)
            said_yes = answer == "Yes."
            assert said_yes == any(c == color for c, _ in present), question
        else:
            listed, color, shape = re.fullmatch(r"(.*)Is there a (\w+) (\w+) in this image\?", question).groups()
            if mode == "scene-text":
                assert sample.image.getcolors() == [(128 * 128, (128, 128, 128))], "scene-text images must be blank"
                items = re.fullmatch(r"The image shows (.*)\. ", listed).group(1).split(", ")
                assert sorted(items) == sorted(f"a {c} {s}" for c, s in present)
                assert answer in (f"The {color} {shape}: Yes.", f"The {color} {shape}: No."), answer
            else:
                assert listed == ""
            said_yes = answer.endswith("Yes.")
            assert said_yes == ((color, shape) in present), question
            if not said_yes:
                assert any(color == c or shape == s for c, s in present), f"{question}: not a hard negative"
        answers[said_yes] += 1
    assert answers[True] > 60 and answers[False] > 60


def test_the_embedding_learning_rate_reaches_exactly_the_input_embeddings(synthetic, tmp_path):
    common = ["--max_steps", "1", "--learning_rate", "3e-4", "--weight_decay", "0.1", "--mask_head_learning_rate", "1e-4"]
    for lora_r in ("-1", "8"):
        args = run_args(synthetic, tmp_path / lora_r, *common, "--lora_r", lora_r, "--embedding_learning_rate", "5e-3")
        check_learning_rate_groups(build_tiny_run(args).trainer, {"embeddings": 5e-3, "mask_head": 1e-4, "rest": 3e-4})
    args = run_args(synthetic, tmp_path / "frozen", "--max_steps", "1", "--lora_r", "0", "--embedding_learning_rate", "1e-3")
    trainer = build_tiny_run(args).trainer
    trainer.model.get_input_embeddings().weight.requires_grad_(False)
    with pytest.raises(ValueError, match="--embedding_learning_rate is set but the input embeddings do not train"):
        trainer.create_optimizer()


def test_made_synthetic_data_must_match_the_asked_settings(tmp_path):
    """--make_synthetic_data writes the task once; a later run asking other settings is refused, not served the old
    data; --synthetic_negative_kinds reaches the written train split."""
    data = str(tmp_path / "data")

    def tiny(**changes):
        return TinyArguments(**{"make_synthetic_data": True, "synthetic_train_images": 6, "synthetic_val_images": 2, **changes})

    ensure_synthetic_data(tiny(synthetic_negative_kinds="color=2,shape=1"), data)
    manifest = json.loads((tmp_path / "data" / "synthetic_grefcoco.json").read_text())["parameters"]
    assert manifest["split_options"]["train"]["negative_kinds"] == {"color": 2.0, "shape": 1.0}
    assert manifest["num_images"] == {"train": 6, "val": 2, "testA": 0, "testB": 0}
    ensure_synthetic_data(tiny(synthetic_negative_kinds="color=2, shape=1"), data)
    with pytest.raises(ValueError, match=r"train negative_kinds: \{'color': 2.0, 'shape': 1.0\} there, None asked"):
        ensure_synthetic_data(tiny(), data)
    with pytest.raises(ValueError, match="train images: 6 there, 7 asked"):
        ensure_synthetic_data(tiny(synthetic_train_images=7, synthetic_negative_kinds="color=2,shape=1"), data)
    with pytest.raises(ValueError, match="only with --make_synthetic_data"):
        ensure_synthetic_data(TinyArguments(synthetic_negative_kinds="color=1"), data)
    (tmp_path / "data" / "synthetic_grefcoco.json").unlink()
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        ensure_synthetic_data(tiny(), data)


def test_with_its_options_off_the_example_trains_exactly_like_the_recipe(synthetic, tmp_path):
    """train_tiny.py composes train_hf.py's building blocks: with no from-scratch option the same flags give the
    same per-step losses, bit for bit."""
    import train_hf

    def losses(build, name):
        run = build(run_args(synthetic, tmp_path / name, "--max_steps", "3", "--logging_steps", "1", "--lora_r", "8"))
        run.trainer.train()
        return [entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry]

    recipe = losses(train_hf.build_run, "recipe")
    assert len(recipe) == 3 and losses(build_tiny_run, "tiny") == recipe


def test_the_mask_loss_boost_trains_as_the_weights_times_the_factor_then_as_the_models_own(synthetic, tmp_path):
    """Two boosted steps move the weights as two steps at 4x the config's mask weights; the logged losses and the
    config stay the model's own; from the step the boost ends, the backpropagated loss is the model's loss."""

    def trained(name, *extra):
        run = build_tiny_run(run_args(synthetic, tmp_path / name, "--max_steps", "2", "--logging_steps", "1", *extra))
        run.trainer.train()
        logged = [(e["mask_bce_loss"], e["mask_dice_loss"]) for e in run.trainer.state.log_history if "mask_bce_loss" in e]
        return run.trainer, {k: v.detach().clone() for k, v in run.trainer.model.named_parameters()}, logged

    boosted, boosted_weights, boosted_logged = trained("boost", "--mask_loss_boost", "4", "--mask_loss_boost_steps", "2")
    _, weighted, weighted_logged = trained("weighted", "--bce_loss_weight", "8", "--dice_loss_weight", "2")
    for name, value in weighted.items():
        torch.testing.assert_close(boosted_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert len(boosted_logged) == 2
    for (bce, dice), (bce4, dice4) in zip(boosted_logged, weighted_logged):
        assert bce == pytest.approx(bce4 / 4, rel=1e-3) and dice == pytest.approx(dice4 / 4, rel=1e-3)
    model = boosted.model
    assert (model.config.bce_loss_weight, model.config.dice_loss_weight) == (2.0, 0.5)
    inputs = next(iter(boosted.get_train_dataloader()))
    model.train()
    boosted.state.global_step = 1
    during, outputs = boosted.compute_loss(model, inputs, return_outputs=True)
    boosted.state.global_step = 2
    after = boosted.compute_loss(model, inputs)
    torch.testing.assert_close(after, outputs.loss)
    torch.testing.assert_close(during, outputs.loss + 3 * (outputs.mask_bce_loss + outputs.mask_dice_loss))


def test_the_vision_stage_prints_progress_lines(tiny_model, tiny_processor, synthetic, capsys):
    labels = ImageContentLabels(synthetic, "train")
    train_vision_features(tiny_model, tiny_processor.image_processor, labels, labels, steps=4, batch_size=2, log_every=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vision step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    assert " loss " in lines[0] and "lr 0.001" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[1]


def test_negative_kinds_flag_is_parsed_and_checked():
    from examples.tiny_synthetic.train_tiny import parse_negative_kinds

    assert parse_negative_kinds(" color=2, shape=1 ,both=0.5", "--x") == {"color": 2.0, "shape": 1.0, "both": 0.5}
    assert parse_negative_kinds("", "--x") is None
    for text in ("colour=1", "color=x", "color=1,color=2", "color", "color=0", "color=-1,shape=2", "color=inf"):
        with pytest.raises(ValueError, match="--x"):
            parse_negative_kinds(text, "--x")


def test_the_vision_stage_trains_a_composed_qwen_tower_on_its_merged_grid(synthetic, tmp_path):
    """A composed Qwen2.5-VL: the stage trains its vision tower (merger inside) and nothing else, on labels laid out
    on the merged token grid the language model reads (the grid is the image processor's, merged 2x2)."""
    from examples.tiny_synthetic.vision_pretraining import _SplitImages
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva

    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", tmp_path / "vlm")
    model, processor = compose_gsva(str(vlm), str(tiny_parts.save_tiny_mask_decoder("sam", tmp_path / "sam")))
    image = _SplitImages(synthetic, "val").images[0]
    inputs = processor.image_processor([image], return_tensors="pt")
    grid = patch_grid(model, processor.image_processor, image)
    assert grid * grid == int(inputs["image_grid_thw"][0].prod()) // 4
    model.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train, val = (TARGETS["both"](synthetic, split, model, grid) for split in ("train", "val"))
    rows = train_vision_features(model, processor.image_processor, train, val, steps=30, batch_size=8, learning_rate=3e-3, eval_every=30)
    assert rows[-1]["loss"] < rows[0]["loss"]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("model.vlm.model.visual.") for name in changed)
    assert "model.vlm.model.visual.merger.mlp.0.weight" in changed


def test_the_vision_tower_redraw_touches_only_the_towers_linear_layers(tmp_path):
    """draw_vision_tower: every linear weight of a composed Qwen tower (merger included) drawn at the asked std,
    their biases zeroed; the patch embedding, the norms and everything outside the tower stay as they were."""
    from examples.tiny_synthetic.from_scratch import draw_vision_tower
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva

    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", tmp_path / "vlm")
    model, _ = compose_gsva(str(vlm), str(tiny_parts.save_tiny_mask_decoder("sam", tmp_path / "sam")))
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    draw_vision_tower(model, 0.5)
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    tower = "model.vlm.model.visual."
    linear = {tower + n for n, m in model.model.vlm.model.visual.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = {n + ".weight" for n in linear}
    biases = {n + ".bias" for n in linear if n + ".bias" in params}
    assert changed == weights | {b for b in biases if before[b].abs().sum() > 0}
    assert all(params[b].abs().sum() == 0 for b in biases)
    assert torch.cat([params[w].flatten() for w in weights]).std().item() == pytest.approx(0.5, rel=0.02)
    with pytest.raises(ValueError, match="--vision_init_std must be a positive finite number"):
        draw_vision_tower(model, 0.0)


@pytest.mark.parametrize(
    "options, tokens, width, heads",
    [
        ([], 25, 128, 16),
        (["--patch_size", "16", "--merge_size", "1", "--temporal_patch_size", "1"], 64, 128, 16),
        (
            ["--width", "256", "--heads", "8", "--intermediate_size", "512", "--full_attention_blocks", "0,1",
             "--vision_init_std", "0.125", "--vision_rope_theta", "100", "--discriminant_tokens", "3"],
            25, 256, 8,
        ),  # fmt: skip
        (["--rope_theta", "100", "--mask_decoder_init", "gsva", "--mask_decoder_heads", "4", "--mask_decoder_mlp_dim", "256"], 25, 128, 16),
        (["--heads", "8", "--mrope_section", "4,2,2"], 25, 128, 8),
    ],
)
def test_the_qwen_sam2_builder_writes_a_folder_with_the_asked_token_grid(synthetic, tmp_path, options, tokens, width, heads):
    """compose_qwen_sam2.py: 128-px task images become the token grid its options ask for (28-px tokens by default,
    16-px ones with patch 16 unmerged), the language model has the asked width and heads (M-RoPE's sections sized to
    the head), its vision stage (with the re-base where asked) reports its seconds, and the folder loads and
    segments."""
    from examples.tiny_synthetic import compose_qwen_sam2
    from examples.tiny_synthetic.vision_pretraining import _SplitImages
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    out = tmp_path / "qwen-sam2"
    compose_qwen_sam2.main([str(out), "--dataset_dir", str(synthetic), "--vision_pretrain_steps", "2", "--lm_init_std", "0.088", *options])
    report = json.loads((tmp_path / "qwen-sam2-parts" / "vision_pretraining.json").read_text())
    assert report["steps"] == 2 and report["seconds"] > 0
    assert ("rebase" in report) == ("--discriminant_tokens" in options)
    if "rebase" in report:
        assert report["rebase"]["k"] == 3 and report["seconds"] > report["rebase"]["seconds"] > 0
    model, processor = GSVAForCausalLM.from_pretrained(out).eval(), GSVAProcessor.from_pretrained(out)
    text = model.model.vlm.config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (width, heads, heads)
    assert 2 * sum(text.rope_parameters["mrope_section"]) == width // heads
    if "--mrope_section" in options:
        assert text.rope_parameters["mrope_section"] == [4, 2, 2]
    blocks = model.model.vlm.config.vision_config.fullatt_block_indexes
    assert blocks == ([0, 1] if "--full_attention_blocks" in options else [1])
    theta = model.model.vlm.config.vision_config.rope_parameters["rope_theta"]
    assert theta == (100 if "--vision_rope_theta" in options else 10000)
    assert text.rope_parameters["rope_theta"] == (100 if "--rope_theta" in options else 10000)
    decoder = model.model.sam.mask_decoder
    assert (decoder.config.num_attention_heads, decoder.config.mlp_dim) == ((4, 256) if "--mask_decoder_heads" in options else (2, 64))
    # The mask decoder's output tokens: PyTorch's default Embedding draw (std 1) as GSVA's from-scratch SAM, or
    # transformers' normal(0.02) as SAM 2 draws itself.
    tokens_std = torch.cat([decoder.iou_token.weight.flatten(), decoder.mask_tokens.weight.flatten()]).std().item()
    assert tokens_std == (pytest.approx(1.0, rel=0.25) if "--mask_decoder_init" in options else pytest.approx(0.02, rel=0.25))
    image = _SplitImages(synthetic, "val").images[0]
    phrases = [["the red circle", "a blue star"]]
    inputs = processor(images=[image], targets=phrases)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    assert patch_grid(model, processor.image_processor, image) ** 2 == tokens
    decided = model.decide_targets(**inputs)
    (result,) = processor.post_process_instance_segmentation(decided, target_sizes=inputs["original_sizes"], targets=phrases)
    assert [t.phrase for t in result.targets] == phrases[0]
    assert all(t.mask.shape == image.shape[:2] for t in result.targets)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm"])
def test_the_diagnosis_and_the_presence_probe_take_a_composed_folder(synthetic, tmp_path, family, capsys):
    """A composed folder (Qwen's patch grid, SmolVLM's tiles): the diagnosis replays every question with other
    images and black ones through the processor, which moves a random model's margins; the probe trains on it."""
    from examples.tiny_synthetic import probe_presence_learning
    from examples.tiny_synthetic.diagnose_synthetic import diagnose
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva

    out = tmp_path / "composed"
    vlm, sam = tiny_parts.save_tiny_vlm(family, tmp_path / "vlm"), tiny_parts.save_tiny_mask_decoder("sam", tmp_path / "sam")
    compose_gsva(str(vlm), str(sam), out)
    report = diagnose(out, synthetic, "val", batch_size=4)
    assert sum(kind["count"] for kind in report["per_kind_accuracy"].values()) == report["slots"] > 0
    assert report["mean_abs_change_other_image"] > 0 and report["mean_abs_change_black_image"] > 0
    probe_presence_learning.main([
        "--preset", str(out), "--dataset_dir", str(synthetic), "--mode", "shape", "--answer", "named", "--steps", "2",
        "--eval-every", "2", "--batch-size", "4", "--threads", "1", "--freeze-vision",
    ])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| shape | 2 |")]
    assert len(rows) == 1 and 0 <= float(rows[0].split("|")[-2]) <= 1


def test_the_discriminant_projection_whitens_within_classes_and_finds_the_separating_direction():
    """Two classes apart along one axis, with a larger within-class spread along another: the one direction found is
    Fisher's (within-class covariance inverse times the difference of the class means), scaled so the (shrunk)
    within-class variance along it is 1, and its ratio is its between/within variance ratio."""
    from examples.tiny_synthetic.vision_pretraining import discriminant_projection

    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    labels = torch.arange(2).repeat_interleave(4000)
    shift = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    tokens = torch.randn(8000, 3, generator=generator, dtype=torch.float64) @ spread + shift[labels]
    mean, projection, ratios = discriminant_projection(tokens, labels, 1, shrinkage=0.0)
    parts = [tokens[labels == c] for c in (0, 1)]
    within = sum((p - p.mean(0)).T @ (p - p.mean(0)) for p in parts) / len(tokens)
    fisher = torch.linalg.solve(within, parts[1].mean(0) - parts[0].mean(0))
    direction = projection[0]
    assert torch.allclose(mean, tokens.mean(0))
    assert abs(torch.nn.functional.cosine_similarity(direction, fisher, dim=0).item()) == pytest.approx(1.0, abs=1e-9)
    assert (direction @ within @ direction).item() == pytest.approx(1.0, rel=1e-9)
    centres = torch.stack([p.mean(0) - mean for p in parts])
    between = sum(len(p) / len(tokens) * (direction @ c) ** 2 for p, c in zip(parts, centres))
    assert ratios.tolist() == pytest.approx([between.item()], rel=1e-9)
    with pytest.raises(ValueError, match="k must be between 1 and min"):
        discriminant_projection(tokens, labels, 2)


def test_each_discriminant_ratio_belongs_to_its_row():
    """Four classes in five dimensions, shrunk: every row's between/within variance ratio (computed apart) is the
    ratio reported beside it, the rows are whitened against the shrunk within-class covariance, and no direction
    separates the classes better than the top one."""
    from examples.tiny_synthetic.vision_pretraining import discriminant_projection

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(2000)
    centres = torch.randn(4, 5, generator=generator, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3, 0.0, 0.0], dtype=torch.float64)
    tokens = torch.randn(8000, 5, generator=generator, dtype=torch.float64) @ torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)) + centres[labels]
    mean, projection, ratios = discriminant_projection(tokens, labels, 3, shrinkage=0.1)
    parts = [tokens[labels == c] for c in range(4)]
    within = sum((p - p.mean(0)).T @ (p - p.mean(0)) for p in parts) / len(tokens)
    shrunk = within + 0.1 * within.trace() / 5 * torch.eye(5, dtype=torch.float64)
    between = sum(len(p) / len(tokens) * torch.outer(p.mean(0) - mean, p.mean(0) - mean) for p in parts)
    assert torch.allclose(projection @ shrunk @ projection.T, torch.eye(3, dtype=torch.float64), atol=1e-9)
    own = [(row @ between @ row / (row @ shrunk @ row)).item() for row in projection]
    assert own == pytest.approx(ratios.tolist(), rel=1e-9)
    assert own == sorted(own)
    for row in torch.randn(200, 5, generator=generator, dtype=torch.float64):
        assert (row @ between @ row / (row @ shrunk @ row)).item() <= own[-1] * (1 + 1e-9)


def test_the_rebase_folds_the_map_into_the_token_layer_and_gives_the_asked_norms(synthetic, tmp_path):
    """rebase_on_discriminants on a composed Qwen tower: only the merger's last linear layer changes, and the tokens
    it now writes are the old ones mapped onto K directions: over the fitting tokens their mean has the asked norm,
    their centred part the asked mean norm and rank K, and it equals the discriminant coordinates (computed apart
    from the old tokens) laid along orthonormal directions. Only the first `max_images` train images are used."""
    from examples.tiny_synthetic.vision_pretraining import (
        discriminant_projection,
        image_features,
        rebase_on_discriminants,
        token_output_layer,
    )
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva

    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", tmp_path / "vlm")
    model, processor = compose_gsva(str(vlm), str(tiny_parts.save_tiny_mask_decoder("sam", tmp_path / "sam")))
    model.eval()
    assert token_output_layer(model) is model.model.vlm.model.visual.merger.mlp[-1]
    with pytest.raises(ValueError, match="k must be below the tokens' width"):
        rebase_on_discriminants(model, processor.image_processor, synthetic, model.config.get_text_config().hidden_size)
    image = PatchContentLabels(synthetic, "val", 8).images[0]
    train = PatchContentLabels(synthetic, "train", patch_grid(model, processor.image_processor, image))
    reference = next(model.parameters())
    with torch.no_grad():
        before = image_features(model, processor.image_processor, train.images[:10], reference).flatten(0, 1).double()
    params = dict(model.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    report = rebase_on_discriminants(model, processor.image_processor, synthetic, 3, max_images=10, centred_norm=5.0, mean_norm=9.0)
    assert report["images"] == 10 and len(report["ratios"]) == 3
    changed = {name for name, p in params.items() if not torch.equal(p, saved[name])}
    assert changed == {"model.vlm.model.visual.merger.mlp.2.weight", "model.vlm.model.visual.merger.mlp.2.bias"}
    with torch.no_grad():
        after = image_features(model, processor.image_processor, train.images[:10], reference).flatten(0, 1).double()
    centre = after.mean(0)
    assert centre.norm().item() == pytest.approx(9.0, rel=1e-4)
    assert (after - centre).norm(dim=1).mean().item() == pytest.approx(5.0, rel=1e-4)
    singular = torch.linalg.svdvals(after - centre)
    assert singular[3] < 1e-4 * singular[0]
    mean, projection, _ = discriminant_projection(before, train.targets[:10].flatten(), 3)
    coordinates = (before - mean) @ projection.T
    coordinates = coordinates * 5.0 / coordinates.norm(dim=1).mean()
    assert torch.allclose(coordinates @ coordinates.T, (after - centre) @ (after - centre).T, atol=1e-3)


def test_the_qwen_sam2_builder_draws_the_same_weights_whatever_the_head_split(synthetic, tmp_path):
    """Heads and M-RoPE sections only split the same projections: a folder built with other ones holds the very
    tensors of the default build (so a folder's config can be changed to them without a new build)."""
    from safetensors.torch import load_file

    from examples.tiny_synthetic import compose_qwen_sam2

    common = ["--dataset_dir", str(synthetic), "--vision_pretrain_steps", "2", "--lm_init_std", "0.088", "--discriminant_tokens", "3",
              "--mask_decoder_init", "gsva"]  # fmt: skip
    weights = []
    for name, split in (("h16", []), ("h8", ["--heads", "8", "--mrope_section", "4,2,2"])):
        compose_qwen_sam2.main([str(tmp_path / name), *common, *split])
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)
    configs = [json.loads((tmp_path / name / "config.json").read_text())["vlm_config"]["text_config"] for name in ("h16", "h8")]
    assert [(c["num_attention_heads"], c["rope_parameters"]["mrope_section"]) for c in configs] == [(16, [1, 1, 2]), (8, [4, 2, 2])]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--discriminant_tokens", "3"], "--discriminant_tokens re-bases"),
        (["--mrope_section", "2,2,1"], r"summing to half the head size \(4 for heads of 8\), got '2,2,1'"),
        (["--heads", "8", "--mrope_section", "4,4,0"], "three positive integers"),
        (["--heads", "8", "--mrope_section", "a,b,c"], "three positive integers"),
        (["--heads", "12"], r"--width \(128\) must be a multiple of --heads \(12\)"),
        (["--mask_pretrain_steps", "-1"], "--mask_pretrain_steps must be >= 0, got -1"),
    ],
)
def test_the_qwen_sam2_builder_refuses_options_it_cannot_build(tmp_path, capsys, options, message):
    from examples.tiny_synthetic import compose_qwen_sam2

    with pytest.raises(SystemExit):
        compose_qwen_sam2.main([str(tmp_path / "out"), *options])
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / "out").exists()


def test_the_token_output_layer_of_the_llava_preset_is_its_projectors_last(tiny_model):
    from examples.tiny_synthetic.vision_pretraining import token_output_layer

    projector = tiny_model.multi_modal_projector
    assert token_output_layer(tiny_model) is (projector.linear_1 if projector.linear_2 is None else projector.linear_2)


def test_the_mask_decoder_probe_names_targets_by_their_pixels(synthetic):
    """Every (colour, shape) target's pixels have its colour in the image (the generator's jitter is at most 10 per
    channel), the pair targets of an image are disjoint and cover its objects, and a colour's target is the union of
    its pairs' targets."""
    from examples.tiny_synthetic.probe_mask_decoder import named_targets, overlaps
    from examples.tiny_synthetic.vision_pretraining import _SplitImages

    split = _SplitImages(synthetic, "val")
    for image, found in zip(split.images, split.objects):
        pairs = named_targets(found, *image.shape[:2], "both")
        colours = named_targets(found, *image.shape[:2], "colour")
        assert sum(int(mask.sum()) for mask in pairs.values()) == int(np.logical_or.reduce(list(pairs.values())).sum())
        assert set(pairs) == {(o["color"], o["shape"]) for o in found}
        for (colour, _), mask in pairs.items():
            assert mask.any() and np.abs(image[mask].astype(int) - PALETTE[colour]).max() <= 10
        for (colour, _), mask in colours.items():
            union = np.logical_or.reduce([m for (c, _), m in pairs.items() if c == colour])
            assert np.array_equal(mask, union)
    truth = [torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])]
    assert overlaps([torch.tensor([[[2.0, -1.0], [3.0, -2.0]]])], truth) == [(1, 3)]


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_the_mask_decoder_probe_trains_a_composed_folder(synthetic, tmp_path, family, capsys):
    """The probe trains the folder's mask path from ideal prompts and reports val scores within [0, 1]; its loss
    reaches the mask decoder's weights and the prompt table; counts below 1 are refused naming the flag."""
    from examples.tiny_synthetic import probe_mask_decoder
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva

    out = tmp_path / "composed"
    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", tmp_path / "vlm")
    compose_gsva(str(vlm), str(tiny_parts.save_tiny_mask_decoder(family, tmp_path / "mask")), out)
    probe_mask_decoder.main([
        "--model", str(out), "--dataset_dir", str(synthetic), "--seconds", "0.01", "--eval_every", "0.01",
        "--val_images", "4", "--batch_size", "2", "--threads", "1",
    ])  # fmt: skip
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "step" not in line]
    assert len(rows) == 1 and rows[0][1].strip() == "1"
    assert all(0.0 <= float(value) <= 1.0 for value in rows[0][3:])
    probe = probe_mask_decoder.MaskDecoderProbe.from_folder(out, "colour")
    split = probe_mask_decoder._SplitImages(synthetic, "train")
    before = {name: p.detach().clone() for name, p in probe.model.model.sam.named_parameters()}
    table = probe.table.weight.detach().clone()
    targets = probe_mask_decoder.split_targets(split, "colour")[:2]
    loss = probe.loss(*probe.batch(split.images[:2], targets))
    loss.backward()
    torch.optim.SGD([*probe.model.model.sam.parameters(), *probe.table.parameters()], lr=0.1).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in probe.model.model.sam.named_parameters())
    assert not torch.equal(table, probe.table.weight)
    assert set(probe.names) == {key for found in targets for key in found}
    with pytest.raises(SystemExit):
        probe_mask_decoder.main(["--model", str(out), "--dataset_dir", str(synthetic), "--val_images", "0"])
    assert "--val_images must be >= 1, got 0" in capsys.readouterr().err


def test_mixed_prompts_offer_every_target_of_the_three_kinds(synthetic):
    """`mixed` gives an image its colour-and-shape, colour and shape targets at once, each under its own key."""
    from examples.tiny_synthetic.probe_mask_decoder import split_targets
    from examples.tiny_synthetic.vision_pretraining import _SplitImages

    split = _SplitImages(synthetic, "val")
    kinds = [split_targets(split, kind) for kind in ("both", "colour", "shape")]
    for mixed, *separate in zip(split_targets(split, "mixed"), *kinds):
        assert sum(len(found) for found in separate) == len(mixed)
        for found in separate:
            assert all(np.array_equal(mixed[key], mask) for key, mask in found.items())


def test_the_mask_stage_trains_the_mask_path_alone(synthetic, tmp_path):
    """`pretrain_mask_path` changes the mask decoder and `text_hidden_fcs`, leaves every other tensor (language
    model, vision tower, embeddings) as it was and the model's mode as it found it, lowers the loss of its prompts,
    and reports val scores within [0, 1] and its seconds; zero steps are refused."""
    from examples.tiny_synthetic.probe_mask_decoder import pretrain_mask_path
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva

    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", tmp_path / "vlm")
    model, processor = compose_gsva(str(vlm), str(tiny_parts.save_tiny_mask_decoder("sam2", tmp_path / "mask")))
    model.model.draw_mask_path()
    model.eval()
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    report = pretrain_mask_path(model, processor, synthetic, 30, batch_size=4, val_images=4)
    assert not model.training
    mask_path = ("model.sam.", "model.text_hidden_fcs.")
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(before[name], tensor)}
    assert changed and all(name.startswith(mask_path) for name in changed)
    assert any(name.startswith("model.sam.mask_decoder.") for name in changed)
    assert any(name.startswith("model.text_hidden_fcs.") for name in changed)
    assert report["steps"] == 30 and report["seconds"] > 0 and report["last_loss"] < report["first_loss"]
    assert 0.0 <= report["val_ciou"] <= 1.0 and 0.0 <= report["val_miou"] <= 1.0
    with pytest.raises(ValueError, match="positive number of steps, got 0"):
        pretrain_mask_path(model, processor, synthetic, 0)


def test_the_qwen_sam2_builder_pretrains_the_mask_path_last(synthetic, tmp_path, capsys):
    """`--mask_pretrain_steps` trains the mask path after every draw: the folder differs from the same build without
    it in the mask path alone, the stage's report is written and its seconds join the clock offset printed."""
    from safetensors.torch import load_file

    from examples.tiny_synthetic import compose_qwen_sam2

    common = ["--dataset_dir", str(synthetic), "--vision_pretrain_steps", "2", "--mask_decoder_init", "gsva"]
    compose_qwen_sam2.main([str(tmp_path / "plain"), *common])
    capsys.readouterr()
    compose_qwen_sam2.main([str(tmp_path / "staged"), *common, "--mask_pretrain_steps", "2"])
    printed = capsys.readouterr().out
    plain, staged = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "staged"))
    assert plain.keys() == staged.keys()
    differ = {key for key in plain if not torch.equal(plain[key], staged[key])}
    assert differ and all(key.startswith(("model.sam.", "model.text_hidden_fcs.")) for key in differ)
    report = json.loads((tmp_path / "staged-parts" / "mask_pretraining.json").read_text())
    vision = json.loads((tmp_path / "staged-parts" / "vision_pretraining.json").read_text())
    assert report["steps"] == 2 and report["seconds"] > 0
    assert not (tmp_path / "plain-parts" / "mask_pretraining.json").exists()
    assert f"--clock_offset_seconds {report['seconds'] + vision['seconds']:.0f} " in printed


def test_the_resolution_ceiling_fits_what_the_logits_can_hold():
    """Masks made of whole low-resolution cells are fitted exactly under both rules; a disc is fitted better at a
    finer side and not exactly at a coarse one; the fitted logits' shape is the asked side."""
    from examples.tiny_synthetic.mask_resolution_ceiling import fit_logits
    from processing_gsva import mask_input_size, upscale_mask_logits

    blocks = torch.zeros(2, 32, 32, dtype=torch.bool)
    blocks[0, 8:20, 4:16] = True
    blocks[1, 0:4, 24:32] = True
    for square in (True, False):
        logits = fit_logits(blocks, 8, 32, square, steps=200)
        assert logits.shape == (2, 8, 8)
        upscaled = upscale_mask_logits(logits, mask_input_size((32, 32), 32, square), (32, 32), 32, square)
        assert torch.equal(upscaled > 0, blocks)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = (((rows - 30.3) ** 2 + (cols - 33.7) ** 2) < 9.5**2)[None]

    def iou(low):
        upscaled = upscale_mask_logits(fit_logits(disc, low, 64, True, steps=300), (64, 64), (64, 64), 64, True) > 0
        return float((upscaled & disc).sum() / (upscaled | disc).sum())

    coarse, fine = iou(8), iou(32)
    assert coarse < 0.97 and fine > coarse
    # On a 24 x 32 image the rules differ (SAM's pads below, SAM 2's stretches the rows): masks drawn by upsampling
    # random logits by one rule are fitted by that rule and less well by the other.
    torch.manual_seed(0)
    drawn = torch.randn(4, 8, 8)

    def upscaled(logits, square):
        return upscale_mask_logits(logits, mask_input_size((24, 32), 32, square), (24, 32), 32, square)

    for made_square in (False, True):
        masks = upscaled(drawn, made_square) > 0
        scores = {}
        for square in (False, True):
            fitted = upscaled(fit_logits(masks, 8, 32, square, steps=300), square) > 0
            scores[square] = float(((fitted & masks).sum((1, 2)) / (fitted | masks).sum((1, 2))).mean())
        assert scores[made_square] > 0.98 and scores[made_square] > scores[not made_square] + 0.02


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_the_resolution_ceiling_reads_the_folders_decoder_sides(synthetic, tmp_path, family, capsys):
    """The command reports the folder's input side and rule and the side of the logits its mask path really
    predicts, one target per colour-and-shape of each val image, and IoUs within [0, 1]."""
    from examples.tiny_synthetic import mask_resolution_ceiling
    from examples.tiny_synthetic.probe_mask_decoder import named_targets
    from examples.tiny_synthetic.vision_pretraining import _SplitImages
    from gsva_hf import tiny_parts
    from gsva_hf.compose import compose_gsva
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    out = tmp_path / "composed"
    vlm = tiny_parts.save_tiny_vlm("qwen2_5_vl", tmp_path / "vlm")
    compose_gsva(str(vlm), str(tiny_parts.save_tiny_mask_decoder(family, tmp_path / "mask")), out)
    capsys.readouterr()
    mask_resolution_ceiling.main(["--model", str(out), "--dataset_dir", str(synthetic), "--steps", "20"])
    report = json.loads(capsys.readouterr().out)
    model, processor = GSVAForCausalLM.from_pretrained(out).eval(), GSVAProcessor.from_pretrained(out)
    pixels = processor.sam_image_processor([Image.new("RGB", (128, 128))], return_tensors="pt")["pixel_values"]
    width = model.model.text_hidden_fcs[0][0].in_features
    with torch.no_grad():
        low_res, _ = model.model.masks_from_hidden_states(
            torch.zeros(1, 1, width), model.model.get_sam_image_embeddings(pixels), torch.ones(1, 1, dtype=torch.bool)
        )
    assert report["logits_side"] == low_res.shape[-1] == low_res.shape[-2]
    assert report["square_input"] == (family == "sam2")
    split = _SplitImages(synthetic, "val")
    assert report["count"] == sum(len(named_targets(f, *i.shape[:2], "both")) for i, f in zip(split.images, split.objects))
    assert 0.0 < report["ciou"] <= 1.0 and 0.0 < report["miou"] <= 1.0
    with pytest.raises(SystemExit):
        mask_resolution_ceiling.main(["--model", str(out), "--steps", "0"])
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
