"""The `datasets` source: a synthetic gRefCOCO tree converted to it gives the same samples and the same metrics,
from `load_from_disk` folders, data-file folders and single Datasets with a `split` column; bad schemas name
the column and the expected form."""

import numpy as np
import pytest

from gsva_hf.data.hf_datasets import HFReferData, tree_to_hf
from gsva_hf.data.hf_datasets import main as convert_main
from gsva_hf.data.mixed import build_val_dataset
from gsva_hf.data.refer import ReferDataError
from gsva_hf.data.refer_seg import ReferSegDataset


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny synthetic task as a tree, written again in the datasets form by the generator's --hf-out flag."""
    from gsva_hf.data.synthetic import main as synthetic_main

    root = tmp_path_factory.mktemp("hf")
    synthetic_main([
        "--out", str(root / "tree"), "--train", "4", "--val", "3", "--testA", "0", "--testB", "0",
        "--image-size", "48", "--seed", "2", "--hf-out", str(root / "hf"),
    ])  # fmt: skip
    return root


def assert_same_samples(tree_dataset, hf_dataset, ignore_meta=()):
    assert len(tree_dataset) == len(hf_dataset) > 0
    for index in range(len(tree_dataset)):
        want, got = tree_dataset[index], hf_dataset[index]
        assert got.rounds == want.rounds and got.targets == want.targets and got.rejected == want.rejected
        assert got.masks.dtype == bool and np.array_equal(got.masks, want.masks)
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
        assert {k: v for k, v in got.meta.items() if k not in ignore_meta} == {
            k: v for k, v in want.meta.items() if k not in ignore_meta
        }


def test_val_samples_and_metrics_equal_the_tree(converted, tiny_model, tiny_processor):
    from gsva_hf.evaluation import evaluate_dataset

    tree = build_val_dataset(converted / "tree", "grefcoco|unc|val")
    hf = build_val_dataset(None, f"hf:{converted / 'hf'}|val")
    assert hf.spec == "grefcoco|hf|val" and hf[0].source == f"hf:{converted / 'hf'}|val"
    assert any(any(sample.rejected) for sample in (tree[i] for i in range(len(tree))))
    assert_same_samples(tree, hf)
    results = [
        evaluate_dataset(tiny_model, tiny_processor, dataset, batch_size=2, progress=False) for dataset in (tree, hf)
    ]
    assert results[0].metrics == results[1].metrics
    assert {"giou", "ciou", "n_acc", "t_acc"} <= set(results[0].metrics)


def test_training_draws_equal_the_tree(converted):
    tree = ReferSegDataset(converted / "tree", "grefcoco", num_classes_per_sample=2, samples_per_epoch=6, seed=1)
    hf = ReferSegDataset(converted / "unused", f"hf:{converted / 'hf'}", num_classes_per_sample=2,
                         samples_per_epoch=6, seed=1)
    assert_same_samples(tree, hf, ignore_meta=("dataset",))
    assert hf[0].meta["dataset"] == f"hf:{converted / 'hf'}"
    on_val = ReferSegDataset(converted / "unused", f"hf:{converted / 'hf'}|val", samples_per_epoch=4, seed=1)
    val_images = build_val_dataset(converted / "tree", "grefcoco|unc|val").image_ids
    assert all(on_val[i].meta["split"] == "val" and on_val[i].meta["image_id"] in val_images for i in range(4))


def test_converter_cli_and_other_layouts(converted, capsys):
    import datasets

    out = converted / "cli"
    convert_main(["--from-tree", str(converted / "tree"), "--spec", "grefcoco|unc|val", "--out", str(out)])
    assert "val:" in capsys.readouterr().out
    tree = build_val_dataset(converted / "tree", "grefcoco|unc|val")
    assert_same_samples(tree, build_val_dataset(None, f"hf:{out}|val"))

    # a folder of data files, as a Hub repo holds them, read through datasets.load_dataset
    val = datasets.load_from_disk(str(out))["val"]
    files = converted / "parquet"
    (files / "data").mkdir(parents=True)
    val.to_parquet(str(files / "data" / "val-00000-of-00001.parquet"))
    assert_same_samples(tree, build_val_dataset(None, f"hf:{files}|val"))

    # one Dataset holding several splits, told apart by its split column
    single = converted / "single"
    datasets.concatenate_datasets([datasets.load_from_disk(str(converted / "hf"))["train"], val]).save_to_disk(
        str(single)
    )
    assert_same_samples(tree, build_val_dataset(None, f"hf:{single}|val"))
    with pytest.raises(ReferDataError, match=r"no row of split 'test'; available: train, val"):
        build_val_dataset(None, f"hf:{single}|test")
    with pytest.raises(ReferDataError, match=r"no split 'testA'; available: val"):
        build_val_dataset(None, f"hf:{out}|testA")
    with pytest.raises(ValueError, match=r"'hf:PATH_OR_REPO\|split'"):
        build_val_dataset(None, f"hf:{out}")
    with pytest.raises(ValueError, match="give its dataset dir"):
        build_val_dataset(None, "grefcoco|unc|val")


def test_bad_schemas_and_rows_are_named(converted):
    import datasets

    val = datasets.load_from_disk(str(converted / "hf"))["val"]
    origin = r"hf:src\[val\]"

    def refused(dataset, pattern):
        with pytest.raises(ReferDataError, match=pattern):
            HFReferData("src", "val", dataset=dataset)

    refused(val.remove_columns("no_target"), rf"{origin}: missing column 'no_target'; expected a bool Value")
    refused(val.remove_columns("image"), r"missing column 'image'; expected an Image\(\) feature")
    refused(
        val.cast_column("image_id", datasets.Value("string")),
        r"column 'image_id' is Value\('string'\); expected an int Value",
    )
    refused(val.remove_columns("masks"), r"exactly one target column, 'masks' .* or 'polygons'")
    rows = val.to_list()
    target_row = next(i for i, row in enumerate(rows) if row["masks"])
    empty_row = next(i for i, row in enumerate(rows) if not row["masks"])

    def with_row(index, **changes):
        edited = [dict(row, **changes) if i == index else row for i, row in enumerate(rows)]
        return datasets.Dataset.from_list(edited, features=val.features)

    ref_id = rows[target_row]["ref_id"]
    refused(with_row(target_row, no_target=True), rf"row {target_row} \(ref_id {ref_id}\): 'no_target' is True")
    refused(with_row(target_row, sentences=[]), rf"row {target_row} .*'sentences' must be a non-empty list")
    garbage = [{"size": rows[target_row]["masks"][0]["size"], "counts": "garbage"}]
    refused(with_row(target_row, masks=garbage), rf"row {target_row} .*masks\[0\].*character 'r' at position 2")
    refused(with_row(target_row, height=7), rf"row {target_row} .*RLE size \[48, 48\] does not match the image \(7x48\)")
    refused(with_row(empty_row, dataset="refcoco"), r"column 'dataset' must hold one name")


def test_polygon_targets(tmp_path):
    import datasets
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    row = {
        "image": {"bytes": (tmp_path / "a.png").read_bytes(), "path": "a.png"}, "image_id": 5, "height": 12,
        "width": 16, "ref_id": 1, "sentences": ["Two Boxes."], "no_target": False,
        "polygons": [[[1, 2, 6, 2, 6, 9, 1, 9]], [[10, 0, 16, 0, 16, 4, 10, 4]]],
    }  # fmt: skip
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int32"), "height": datasets.Value("int32"),
        "width": datasets.Value("int32"), "ref_id": datasets.Value("int32"),
        "sentences": datasets.List(datasets.Value("string")), "no_target": datasets.Value("bool"),
        "polygons": datasets.List(datasets.List(datasets.List(datasets.Value("float32")))),
    })  # fmt: skip
    datasets.DatasetDict({"val": datasets.Dataset.from_list([row], features=features)}).save_to_disk(str(tmp_path / "p"))
    sample = build_val_dataset(None, f"hf:{tmp_path / 'p'}|val")[0]
    want = np.zeros((12, 16), dtype=bool)
    want[2:9, 1:6] = True
    want[0:4, 10:16] = True
    assert sample.targets == ["two boxes"] and sample.rejected == [False]
    assert np.array_equal(sample.masks[0], want) and np.array_equal(np.asarray(sample.image), np.asarray(image))
    bad = dict(row, polygons=[[[1, 2, 6, 2, float("nan"), 9]]])
    dataset = datasets.Dataset.from_list([bad], features=features)
    with pytest.raises(ReferDataError, match=r"row 0 \(ref_id 1\): polygons\[0\] \(image 5\): .*non-finite x"):
        HFReferData("src", "val", dataset=dataset.add_column("split", ["val"]))


def test_tree_to_hf_in_memory_round_trip(converted):
    result = tree_to_hf(converted / "tree", ["grefcoco|unc|val"])
    data = HFReferData("memory", "val", dataset=result["val"])
    tree = build_val_dataset(converted / "tree", "grefcoco|unc|val")
    assert data.image_ids("val") == tree.image_ids
    with pytest.raises(ValueError, match="name a split twice"):
        tree_to_hf(converted / "tree", "grefcoco|unc|val||grefcoco|unc|val")


def test_train_hf_and_eval_hf_read_the_datasets_form(converted, tmp_path):
    """train_hf trains on `hf:` refer data and evaluates an `hf:` val split; eval_hf scores the export on the
    `hf:` split (no --dataset_dir) and on the tree with the same numbers."""
    import json

    import eval_hf
    import train_hf
    from tests.conftest import REPO

    hf = converted / "hf"
    output = tmp_path / "run"
    run = train_hf.build_run([
        "--model_name_or_path", str(REPO / "configs" / "gsva-tiny"), "--dataset_dir", str(tmp_path / "none"),
        "--dataset", "refer_seg", "--sample_rates", "1", "--refer_seg_data", f"hf:{hf}", "--output_dir", str(output),
        "--use_cpu", "true", "--per_device_train_batch_size", "2", "--max_steps", "2", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--lora_r", "8", "--val_dataset", f"hf:{hf}|val",
        "--eval_batch_size", "2",
    ])  # fmt: skip
    run.trainer.train()
    recorded = train_hf.finish_run(run)
    assert json.loads((output / "eval_results.json").read_text())["metrics"] == recorded
    common = ["--model", str(output / "final"), "--batch_size", "3", "--no_progress"]
    from_hf = eval_hf.main([*common, "--val_dataset", f"hf:{hf}|val", "--output", str(tmp_path / "a.json")])
    from_tree = eval_hf.main([
        *common, "--dataset_dir", str(converted / "tree"), "--val_dataset", "grefcoco|unc|val",
        "--output", str(tmp_path / "b.json"),
    ])  # fmt: skip
    assert from_hf[f"hf:{hf}|val"] == from_tree["grefcoco|unc|val"] == recorded


def test_refcoco_family_and_every_segmentation_kind_convert(tmp_path):
    """The fixture tree of test_data_refer (polygons, compressed and uncompressed RLEs, dropped short polygons,
    a refcocog Python-2 pickle) converts to samples equal to the tree's, split by split."""
    from tests.data.test_data_refer import write_tree

    write_tree(tmp_path / "tree")
    for specs in (["refcoco|unc|val", "refcoco|unc|testB"], ["refcocog|umd|test"], ["grefcoco|unc|val"]):
        out = tmp_path / specs[0].split("|")[0]
        tree_to_hf(tmp_path / "tree", specs, out)
        for spec in specs:
            dataset, _, split = spec.split("|")
            hf = build_val_dataset(None, f"hf:{out}|{split}")
            assert hf.spec == f"{dataset}|hf|{split}"
            assert_same_samples(build_val_dataset(tmp_path / "tree", spec), hf)
