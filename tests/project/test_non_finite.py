"""Non-finite numbers are errors, named: training losses and gradients, exported and pushed weights, loaded models,
inference outputs, and every JSON the project writes. Also: evaluation keeps finished work when one sample cannot
be run, and typed "[SEG]" in training text stays text."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, TINY


def _reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_load(path) -> object:
    """json.loads that refuses NaN / Infinity, as every strict JSON reader does."""
    return json.loads(Path(path).read_text(), parse_constant=_reject_constant)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_grefcoco(root, num_images={"train": 8, "val": 3, "testA": 0, "testB": 0}, seed=3)
    return root


def edit_sentences(root, split: str, edit) -> None:
    """Rewrite the sentences of `split` in the synthetic tree's grefs file with `edit(refs_of_split)`."""
    from gsva_hf.data.synthetic import GREFCOCO_SUBDIR, GREFS_NAME

    path = Path(root) / GREFCOCO_SUBDIR / GREFS_NAME
    refs = json.loads(path.read_text())
    edit([ref for ref in refs if ref["split"] == split])
    path.write_text(json.dumps(refs))


def train_args(data_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(TINY), "--dataset_dir", str(data_dir), "--dataset", "refer_seg",
        "--sample_rates", "1", "--refer_seg_data", "grefcoco", "--output_dir", str(output_dir), "--use_cpu", "true",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7",
        "--save_strategy", "no", "--val_dataset", "", "--logging_steps", "1", *extra,
    ]  # fmt: skip


def exit_status(main, argv) -> int:
    """A command's exit status, whether its `main` returns it or exits with it."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


def named_non_finite(error) -> bool:
    """The refusal is the project's NonFiniteError (a ValueError, so the commands report it like other inputs)."""
    return type(error).__name__ == "NonFiniteError" and isinstance(error, ValueError)


def with_nan(model, names: list[str]):
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name in names:
            parameters[name].view(-1)[0] = float("nan")
    return model


LM_HEAD = "lm_head.weight"


# ------------------------------------------------------------------------------------------------ training
def test_training_stops_at_the_first_non_finite_loss_naming_step_and_part(synthetic_dir, tmp_path, capsys):
    import train_hf

    output = tmp_path / "run"
    with pytest.raises(ValueError, match=r"step (\d+)/6: the (ce|bce|dice)( and (ce|bce|dice))* loss") as caught:
        run = train_hf.build_run(train_args(synthetic_dir, output, "--max_steps", "6", "--learning_rate", "1e6"))
        train_hf.train_and_finish(run)
    step = int(re.search(r"step (\d+)/6", str(caught.value)).group(1))
    assert "nothing was exported" in str(caught.value) and named_non_finite(caught.value)
    assert not (output / "final").exists()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == step - 1 and not any(" nan" in line or "loss 0 " in line for line in lines)


def test_training_stops_at_a_non_finite_gradient_norm_naming_the_parameter(synthetic_dir, tmp_path):
    import train_hf

    run = train_hf.build_run(train_args(synthetic_dir, tmp_path / "run", "--max_steps", "2", "--lora_r", "0"))
    name, parameter = next((n, p) for n, p in run.trainer.model.named_parameters() if "text_hidden_fcs" in n and p.requires_grad)
    before = parameter.detach().clone()
    parameter.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(ValueError, match=r"step 1/2: the gradient norm is not finite") as caught:
        run.trainer.train()
    assert name in str(caught.value) and named_non_finite(caught.value)
    assert torch.equal(parameter.detach(), before)  # stopped before the optimizer step


# ------------------------------------------------------------------------------------------ export and push
def test_export_refuses_a_model_with_non_finite_tensors_naming_them(tiny_model, tiny_processor, tmp_path):
    from gsva_hf.training import export_model

    bad = [LM_HEAD, "model.text_hidden_fcs.0.0.weight"]
    with pytest.raises(ValueError, match=r"2 of \d+ tensors hold NaN or infinite values") as caught:
        export_model(with_nan(tiny_model, bad), tiny_processor, tmp_path / "final")
    assert all(name in str(caught.value) for name in bad) and named_non_finite(caught.value)
    assert not (tmp_path / "final").exists()


def test_export_names_the_first_few_and_counts_all(tiny_model, tiny_processor, tmp_path):
    from gsva_hf.training import export_model

    names = [name for name, _ in tiny_model.named_parameters()][:12]
    with pytest.raises(ValueError, match=r"12 of \d+ tensors .* and 7 more"):
        export_model(with_nan(tiny_model, names), tiny_processor, tmp_path / "final")


def test_push_and_its_dry_run_refuse_non_finite_weights(tiny_model, tiny_processor, tmp_path, capsys):
    from gsva_hf import hub

    folder = tmp_path / "model"
    with_nan(tiny_model, [LM_HEAD]).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    out = tmp_path / "repo"
    assert exit_status(hub.main, [str(folder), "user/broken", "--dry-run", "--out", str(out)]) == 2
    assert "1 of " in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match=LM_HEAD):
        hub.layout_repo(folder, out, "user/broken")
    assert not out.exists()


def test_push_refuses_weights_that_overflow_in_the_asked_dtype(tiny_model, tiny_processor, tmp_path, capsys):
    from gsva_hf import hub

    with torch.no_grad():
        tiny_model.get_output_embeddings().weight[0, 0] = 1e6  # finite in fp32, infinite in fp16
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    argv = [str(folder), "user/big", "--dry-run", "--out", str(tmp_path / "repo"), "--dtype", "fp16"]
    assert exit_status(hub.main, argv) == 2
    assert f"{LM_HEAD} (inf" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ inference
def test_load_gsva_and_gsva_segment_refuse_non_finite_weights(tiny_model, tiny_processor, tmp_path, capsys):
    from gsva_hf.loading import load_gsva
    from gsva_hf.segment import main as segment_main

    folder = tmp_path / "model"
    with_nan(tiny_model, [LM_HEAD]).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: 1 of \d+ tensors .*{LM_HEAD}"):
        load_gsva(folder)
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(image)
    argv = [str(image), "a red square", "--model", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert exit_status(segment_main, argv) == 2 and LM_HEAD in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("result.json"))


@pytest.fixture()
def overflowing_model(tiny_model):
    """Finite weights whose outputs overflow: the LM head's scale makes the [SEG]/[REJ] logits infinite."""
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.fill_(3e38)
    return tiny_model


def test_segment_refuses_non_finite_outputs_naming_the_slots(overflowing_model, tiny_processor):
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    with pytest.raises(ValueError, match=r"image 0: the model's outputs are not finite \(slot 0 score nan"):
        overflowing_model.segment(tiny_processor, image, targets=["a red square", "a dog"])


def test_gsva_segment_fails_the_image_with_non_finite_outputs_and_writes_strict_json(
    overflowing_model, tiny_processor, tmp_path, capsys
):
    from gsva_hf.segment import SUMMARY
    from gsva_hf.segment import main as segment_main

    folder = tmp_path / "model"
    overflowing_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(image)
    out = tmp_path / "out"
    argv = [str(image), "a red square; a dog", "--model", str(folder), "--out", str(out), "--device", "cpu"]
    assert exit_status(segment_main, argv) == 1 and "not finite" in capsys.readouterr().err
    summary = strict_load(out / SUMMARY)
    assert summary["images"][0]["status"] == "failed" and "not finite" in summary["images"][0]["problems"][0]
    assert not (out / "result.json").exists()


# ------------------------------------------------------------------------------------------------ JSON
def test_metrics_json_is_strict_nan_becomes_null_and_infinity_is_refused(tmp_path):
    from gsva_hf.metrics import GresAccumulator

    accumulator = GresAccumulator()
    accumulator.add(np.zeros((4, 4), dtype=bool), np.ones((4, 4), dtype=np.uint8), False, "0:0")
    accumulator.write_json(tmp_path / "eval.json", note=float("nan"))
    payload = strict_load(tmp_path / "eval.json")
    assert payload["metrics"]["n_acc"] is None and payload["note"] is None
    with pytest.raises(ValueError, match=r"eval\.json: cannot write it as JSON"):
        accumulator.write_json(tmp_path / "eval.json", note=float("inf"))
    from gsva_hf.metrics import strict_json

    assert strict_json({"a": np.float32("nan"), "b": (1, 2)}, "x") == '{\n  "a": null,\n  "b": [\n    1,\n    2\n  ]\n}'


def test_every_json_file_the_project_writes_is_written_strictly():
    """Each `json.dumps` that ends in a file passes allow_nan=False (or goes through metrics.strict_json)."""
    loose = []
    for path in [REPO / "eval_hf.py", REPO / "train_hf.py", *sorted((REPO / "gsva_hf").rglob("*.py"))]:
        if "assets" in path.parts:
            continue
        text = path.read_text()
        for match in re.finditer(r"(write_text|\.write|json\.dump)\(\(?json\.dumps\(|json\.dump\(", text):
            call = text[match.start() : text.find("\n", match.end())]
            if "allow_nan=False" not in call:
                loose.append(f"{path.relative_to(REPO)}: {call.strip()}")
    assert not loose, loose


# ------------------------------------------------------------------------------------------------ evaluation
def test_targets_mode_keeps_every_sample_when_one_expression_cannot_be_written(synthetic_dir, tmp_path, capsys, caplog):
    import eval_hf

    data = tmp_path / "data"
    import shutil

    shutil.copytree(synthetic_dir, data)

    def only_dots(refs):
        refs[-1]["sentences"][0]["sent"] = refs[-1]["sentences"][0]["raw"] = "..."

    edit_sentences(data, "val", only_dots)
    torch.manual_seed(0)
    from configuration_gsva import GSVAConfig
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    model_dir = tmp_path / "model"
    GSVAForCausalLM(GSVAConfig.from_pretrained(TINY)).save_pretrained(model_dir)
    GSVAProcessor.from_pretrained(TINY).save_pretrained(model_dir)
    output = tmp_path / "eval.json"
    metrics = eval_hf.main([
        "--model", str(model_dir), "--dataset_dir", str(data), "--val_dataset", "grefcoco|unc|val", "--mode", "targets",
        "--output", str(output), "--batch_size", "2", "--no_progress",
    ])  # fmt: skip
    report = strict_load(output)
    images = report["images"]
    assert len(images) == 3 and [image["index"] for image in images] == [0, 1, 2]
    failed = [image for image in images if "error" in image]
    assert len(failed) == 1 and failed[0]["error"].startswith("ValueError: targets must")
    assert failed[0]["pred_rejected"] == [True] * len(failed[0]["targets"])
    slots = sum(len(image["targets"]) for image in images)
    assert metrics["grefcoco|unc|val"]["count"] == slots
    assert "1 of 3 samples have no prediction" in caplog.text


def test_evaluation_raises_when_no_sample_can_be_run(synthetic_dir, tiny_model, tiny_processor, tmp_path):
    from gsva_hf.data.mixed import build_val_dataset
    from gsva_hf.evaluation import evaluate_dataset

    dataset = build_val_dataset(str(synthetic_dir), "grefcoco|unc|val")
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.fill_(3e38)
    with pytest.raises(ValueError, match=r"no sample could be evaluated; the first: ValueError: image 0"):
        evaluate_dataset(tiny_model, tiny_processor, dataset, mode="targets", batch_size=2, progress=False)


# ------------------------------------------------------------------------------------------------ typed [SEG]
def test_a_training_sentence_holding_seg_and_rej_keeps_one_slot_per_mask(synthetic_dir, tmp_path, tiny_processor):
    import pickle
    import shutil

    from gsva_hf.data.collator import GSVACollator
    from gsva_hf.data.refer_seg import ReferSegDataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)

    def typed_tokens(refs):
        for ref in refs:
            sentence = ref["sentences"][0]
            sentence["sent"] = sentence["raw"] = f"the [SEG] {sentence['sent']} [REJ]"

    edit_sentences(data, "train", typed_tokens)
    dataset = ReferSegDataset(data, "grefcoco", samples_per_epoch=12, seed=1)
    samples = [pickle.loads(pickle.dumps(dataset[index])) for index in range(12)]  # as DataLoader workers pass them
    assert all("[SEG]" in target for sample in samples for target in sample.targets)
    batch = GSVACollator(tiny_processor)(samples)
    ids = tiny_processor.token_ids
    for row, sample in enumerate(samples):
        row_ids = batch["input_ids"][row]
        slots = row_ids[(row_ids == ids["seg_token_id"]) | (row_ids == ids["rej_token_id"])]
        assert len(slots) == sample.masks.shape[0]
        assert [bool(s == ids["rej_token_id"]) for s in slots] == sample.rejected
        trained = tiny_processor.tokenizer.decode(batch["labels"][row][batch["labels"][row] >= 0])
        assert trained.count("[SEG]") == sample.rejected.count(False) + len(sample.targets)


def test_typed_seg_in_explanations_and_vqa_answers_stays_text(tiny_processor):
    from gsva_hf.data.prompts import ANSWER_LIST, multi_target_answer
    from gsva_hf.data.vqa import conversation_rounds

    rounds = conversation_rounds([{"from": "human", "value": "What is written?"}, {"from": "gpt", "value": "[SEG]"}], "x")
    ids, labels = tiny_processor.encode_conversation(rounds)
    special = {tiny_processor.token_ids["seg_token_id"], tiny_processor.token_ids["rej_token_id"]}
    assert not special & set(ids) and tiny_processor.tokenizer.decode([t for t in labels if t >= 0]).startswith("[SEG]")
    # A name holding "SEG" is kept as typed when its slot is rejected.
    assert multi_target_answer(["SEGMENT sign"], [True], style=0) == "The segmentation results are SEGMENT sign [REJ]."
    from processing_gsva import AnswerText

    explained = AnswerText.join([(ANSWER_LIST[0] + " ", False), ("a sign reading [REJ]", True)])
    ids, _ = tiny_processor.encode_conversation([("Why?", explained)])
    assert sum(t in special for t in ids) == ANSWER_LIST[0].count("[SEG]")
