"""benchmarks/bench_pairs.py at tiny scale on the CPU: both Qwen pair presets build, run target mode and a training
step with finite positive times and memory, with the tokenizer's ids in the config; at real scale, the processor
expands each preset's image to the token count `pair_presets` counts with."""

import json
import math

import pytest
import torch

from benchmarks import bench_pairs
from gsva_hf import pair_presets, tiny_parts
from processing_gsva import REJ_TOKEN, SEG_TOKEN

QWEN_PRESETS = ["qwen2.5-vl-3b+sam2.1-hiera-l", "qwen3-vl-4b+sam2.1-hiera-b+"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "pairs.json"
    argv = ["--preset", ",".join(QWEN_PRESETS), "--scale", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1"]
    threads = torch.get_num_threads()
    try:  # one thread: two busy shared cores make every tiny op wait for the other thread
        rows = bench_pairs.main(argv + ["--repeats", "1", "--dtype", "float32", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    return rows, json.loads(out.read_text())


def test_tiny_rows_have_finite_positive_times_and_memory(report):
    rows, written = report
    assert [row["preset"] for row in rows] == QWEN_PRESETS
    for row in rows:
        assert "skipped" not in row and "target_mode_error" not in row and "train_error" not in row, row
        for key in ("build_s", "target_mode_s_per_image", "train_s_per_step", "target_mode_peak_mib", "train_peak_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["preset"], key, row[key])
        assert row["trainable_parameters"] < row["parameters"], "the vision tower and SAM image encoder are frozen"
        assert row["losses"] and all(loss is not None and loss > 0 for loss in row["losses"])
    assert written["rows"] == rows
    assert written["device_name"] and written["versions"]["torch"] and "--scale tiny" in written["command"]


def test_config_token_ids_are_the_tokenizers(report):
    rows, _ = report
    for row, name in zip(rows, QWEN_PRESETS):
        family = pair_presets.vlm_config(name).model_type
        config, processor = bench_pairs.composed_parts(name, "tiny")
        tokenizer = processor.tokenizer
        assert (
            config.image_token_id
            == tokenizer.convert_tokens_to_ids("<|image_pad|>")
            == config.vlm_config.image_token_id
        )
        assert config.seg_token_id == tokenizer.convert_tokens_to_ids(SEG_TOKEN) != tokenizer.unk_token_id
        assert config.rej_token_id == tokenizer.convert_tokens_to_ids(REJ_TOKEN) != tokenizer.unk_token_id
        assert config.vlm_config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert config.get_text_config().eos_token_id == tokenizer.eos_token_id
        assert len(tokenizer) <= config.get_text_config().vocab_size < len(tokenizer) + 64
        assert row["config_token_ids"] == {
            "image_token_id": config.image_token_id,
            "seg_token_id": config.seg_token_id,
            "rej_token_id": config.rej_token_id,
        }
        assert len(tiny_parts.tiny_tokenizer(family)) + 2 == len(tokenizer)


@pytest.mark.parametrize("name", QWEN_PRESETS)
def test_real_processor_expands_the_preset_image_to_its_counted_tokens(name):
    """Only configs and the processor are built (no weights): the real-size image rule, against `image_tokens`."""
    config, processor = bench_pairs.composed_parts(name, "real")
    images = bench_pairs.random_images(1, bench_pairs.image_side(name, "real"))
    inputs = processor(images=images, targets=[bench_pairs.TARGETS])
    counted = pair_presets.image_tokens(pair_presets._Parts(name))
    assert config.get_text_config().vocab_size == pair_presets.vlm_config(name).get_text_config().vocab_size
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == counted
    assert inputs["sam_pixel_values"].shape[-2:] == (1024, 1024)


def test_smolvlm_real_image_processor_gives_the_presets_crops():
    name = "smolvlm2-2.2b+edgetam"
    processor = bench_pairs.vlm_image_processor(name, "real")
    side = bench_pairs.image_side(name, "real")
    out = processor([bench_pairs.random_images(1, side)], return_tensors="pt", return_row_col_info=True)
    assert out["pixel_values"].shape[1] == 5 and out["pixel_values"].shape[-1] == 384  # 2x2 crops + the global view


def test_edgetam_without_timm_is_reported_as_skipped(monkeypatch):
    monkeypatch.setattr(bench_pairs, "is_timm_available", lambda: False)
    args = bench_pairs.build_parser().parse_args(["--preset", "smolvlm2-2.2b+edgetam", "--scale", "tiny"])
    row = bench_pairs.run_preset("smolvlm2-2.2b+edgetam", args)
    assert "timm" in row["skipped"]
    assert "| smolvlm2-2.2b+edgetam |" in bench_pairs.markdown_row(row)


def test_unknown_preset_is_refused_naming_the_argument(capsys):
    with pytest.raises(SystemExit):
        bench_pairs.main(["--preset", "llava-1.5+sam"])
    assert "--preset" in capsys.readouterr().err
