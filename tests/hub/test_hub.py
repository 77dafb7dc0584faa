"""gsva-push: the dry-run repository loads with remote code in a clean process, its card's snippet runs, the
metadata parses with huggingface_hub, shards respect the size, uploads go through HfApi, and bad input is named."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from PIL import Image, ImageDraw

from gsva_hf import hub
from gsva_hf.segment import DEFAULT_MODEL
from tests._fresh_process import ISOLATE
from tests.conftest import REPO, card_snippet_lines, exit_status

REPO_ID = "someone/gsva-tiny-test"
SHARD_LIMIT = 1_000_000  # "1MB": the tiny model (~5 MB in fp32) needs several shards
EVAL = {
    "kind": "gres",
    "config": {"protocol": "gsva"},
    "metrics": {"giou": 0.612345, "ciou": 0.55, "n_acc": 0.4, "t_acc": None, "count": 250},
    "val_dataset": "grefcoco|unc|val",
    "mode": "generate",
    "protocol": "gsva",
    "model": "outputs/x",
    "dtype": "fp32",
    "log_line": "grefcoco giou: 0.6123, ciou: 0.5500, N_acc: 0.4000, T_acc: nan.",
}

# Runs in a process that cannot import the project: the Auto classes must come from the folder's own code.
FRESH = ISOLATE + textwrap.dedent(
    """
    import runpy
    folder, repo, snippets = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAConfig"
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAModel"
    assert type(AutoProcessor.from_pretrained(folder, trust_remote_code=True)).__name__ == "GSVAProcessor"
    for snippet in snippets:
        print("=== snippet ===", flush=True)
        runpy.run_path(snippet, run_name="__main__")
    """
)


def shapes_image(path):
    image = Image.new("RGB", (96, 72), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse([8, 10, 40, 42], fill=(220, 40, 40))
    draw.rectangle([56, 20, 86, 50], fill=(40, 80, 230))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from configuration_gsva import GSVAConfig
    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GSVAForCausalLM(GSVAConfig.from_pretrained(REPO / "configs" / "gsva-tiny")).eval().save_pretrained(folder)
    GSVAProcessor.from_pretrained(REPO / "configs" / "gsva-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def layout(model_dir, tmp_path_factory):
    """One dry run shared by the checks below: 1 MB shards, an eval JSON, an example image, flags for the card."""
    work = tmp_path_factory.mktemp("hub")
    (work / "eval.json").write_text(json.dumps(EVAL))
    example = shapes_image(work / "shapes.png")
    out = work / "repo"
    argv = [str(model_dir), REPO_ID, "--dry-run", "--out", str(out), "--max-shard-size", "1MB"]
    argv += ["--eval-json", str(work / "eval.json"), "--example-image", str(example)]
    argv += ["--base-model", "openai/clip-vit-large-patch14", "--base-model", "facebook/sam-vit-huge"]
    argv += ["--dataset", "someone/grefcoco", "--tag", "tiny"]
    assert hub.main(argv) == 0
    return out


def run_snippets(folder, tmp_path, snippets: list[str]) -> list[str]:
    """What each snippet prints, run from a clean process against `folder` instead of the Hub repo."""
    paths = []
    for index, code in enumerate(snippets):
        assert f'model_id = "{REPO_ID}"' in code and "trust_remote_code=True" in code and "revision=revision" in code
        paths.append(tmp_path / f"snippet_{index}.py")
        paths[-1].write_text(code.replace(f'"{REPO_ID}"', json.dumps(str(folder))))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", FRESH, str(folder), str(REPO), *map(str, paths)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("=== snippet ===\n")[1:]


def card_snippet(folder) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


@pytest.mark.slow
def test_dry_run_loads_in_a_fresh_process_and_the_card_snippet_runs(layout, tmp_path):
    """The card's snippet (it reads the shipped example.png) and the variant for repos without one both run."""
    drawn = hub.usage_snippet(REPO_ID, list(hub.SYNTHETIC_TARGETS), with_example=False)
    printed, printed_drawn = run_snippets(layout, tmp_path, [card_snippet(layout), drawn])
    assert printed_drawn.strip()

    # The same call in this process gives the lines the snippet must have printed.

    assert printed == card_snippet_lines(layout, hub.REAL_TARGETS)


def test_card_metadata_parses_with_huggingface_hub(layout):
    from huggingface_hub import ModelCard

    card = ModelCard.load(layout / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert {"custom_code", "gsva", "referring-segmentation", "tiny"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.language == ["en"]
    assert data.base_model == ["openai/clip-vit-large-patch14", "facebook/sam-vit-huge"]
    assert data.to_dict()["base_model_relation"] == "merge"
    assert data.datasets == ["someone/grefcoco"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"giou", "ciou", "n_acc"}  # t_acc is undefined (null) in the JSON
    giou = results["giou"]
    assert giou.metric_value == 61.23 and giou.dataset_type == "grefcoco" and giou.dataset_name == "gRefCOCO"
    assert (giou.dataset_config, giou.dataset_split, giou.metric_config) == ("unc", "val", "gsva/generate")
    assert data.model_name == "gsva-tiny-test"
    assert "| gRefCOCO | val | generate | gsva | 61.23 | 55.00 | 40.00 | – | 250 | fp32 |" in card.text
    assert "Pin a revision" in card.text and 'revision="<commit hash>"' in card.text


def test_repository_files_and_shard_sizes(layout, model_dir):
    from safetensors import safe_open

    names = set(os.listdir(layout))
    assert {
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
        "example.png",
    } <= names
    assert set(hub.CODE_FILES) <= names
    assert set(json.loads((layout / "config.json").read_text())["auto_map"]) == set(hub.AUTO_CLASSES)
    index = json.loads((layout / "model.safetensors.index.json").read_text())
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards

    from safetensors.torch import load_file

    original = load_file(model_dir / "model.safetensors")
    seen = {}
    for shard in shards:
        with safe_open(layout / shard, "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= SHARD_LIMIT or len(tensors) == 1, (shard, size)
        seen.update(tensors)
    assert seen.keys() == original.keys()
    assert all(torch.equal(seen[k], original[k]) for k in original)


def test_upload_goes_through_hf_api(model_dir, tmp_path, monkeypatch):
    api = mock.MagicMock()
    uploaded = {}

    def upload_folder(**kwargs):
        uploaded["files"] = sorted(os.listdir(kwargs["folder_path"]))
        return mock.Mock(commit_url="https://huggingface.co/someone/gsva-tiny-test/commit/abc")

    api.upload_folder.side_effect = upload_folder
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    argv = [str(model_dir), REPO_ID, "--revision", "dev", "--private", "--commit-message", "first release"]
    assert hub.main(argv) == 0
    api.create_repo.assert_called_once_with(REPO_ID, repo_type="model", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(REPO_ID, branch="dev", repo_type="model", exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert (kwargs["repo_id"], kwargs["revision"], kwargs["commit_message"]) == (REPO_ID, "dev", "first release")
    assert "*.safetensors" in kwargs["delete_patterns"] and not kwargs["create_pr"]
    assert {"README.md", "config.json", "model.safetensors", *hub.CODE_FILES} <= set(uploaded["files"])
    assert not os.path.exists(kwargs["folder_path"])  # the temporary layout is cleaned up

    api.upload_folder.side_effect = RuntimeError("401 Unauthorized")
    assert hub.main([str(model_dir), REPO_ID]) == 1


def test_bad_inputs_are_named(model_dir, tmp_path, capsys):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.5}))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    out = ["--dry-run", "--out", str(tmp_path / "out")]
    cases = [
        ([str(llava), REPO_ID, *out], "model_type 'llava', expected 'gsva'"),
        ([str(adapter), REPO_ID, *out], "LoRA adapter"),
        ([str(tmp_path / "missing"), REPO_ID, *out], "no such folder"),
        ([str(model_dir), REPO_ID, *out, "--eval-json", str(tmp_path / "nope.json")], "nope.json: cannot read"),
        ([str(model_dir), REPO_ID, *out, "--eval-json", str(tmp_path / "broken.json")], "broken.json: not valid JSON"),
        ([str(model_dir), REPO_ID, *out, "--eval-json", str(tmp_path / "other.json")], "other.json: missing metrics"),
        ([str(model_dir), REPO_ID, *out, "--license", "other"], "--license other needs"),
        (
            [str(model_dir), REPO_ID, *out, "--max-shard-size", "big"],
            "--max-shard-size 'big': expected a positive size",
        ),
        ([str(model_dir), REPO_ID, *out, "--eval-name", "a"], "--eval-name given 1 times but --eval-json 0 times"),
        ([str(model_dir), REPO_ID, "--dry-run", "--out", str(busy), "--overwrite"], "not written by gsva-push (no .gsva-push file in it)"),
        ([str(model_dir), REPO_ID, "--dry-run", "--out", str(busy)], "pass --overwrite"),
    ]
    for argv, message in cases:
        assert exit_status(hub.main, argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert (busy / "notes.txt").read_text() == "keep me"
    for argv in ([str(model_dir), REPO_ID, "--dry-run"], [str(model_dir), "no-namespace", *out]):
        with pytest.raises(SystemExit):
            hub.main(argv)


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason=f"the bundled model {DEFAULT_MODEL} is not there yet")
def test_bundled_model_card_snippet_prints_targets(tmp_path):
    """With trained weights the snippet's loop runs too: one line per target, with its rejection flag."""
    example = hub.BUNDLED_EXAMPLE if hub.BUNDLED_EXAMPLE.is_file() else shapes_image(tmp_path / "shapes.png")
    out = tmp_path / "repo"
    assert hub.main([str(DEFAULT_MODEL), REPO_ID, "--dry-run", "--out", str(out), "--example-image", str(example)]) == 0
    (printed,) = run_snippets(out, tmp_path, [card_snippet(out)])
    targets = [line for line in printed.splitlines() if "rejected=" in line and "mask pixels=" in line]
    assert targets, printed


def test_overwrite_replaces_only_a_folder_gsva_push_wrote(model_dir, tmp_path, capsys):
    """A converted model folder (config, README, the user's notes) is refused; an earlier layout is replaced."""
    converted = tmp_path / "converted"
    shutil.copytree(model_dir, converted)
    (converted / "README.md").write_text("# my converted model\n")
    (converted / "notes.txt").write_text("keep me")
    before = sorted(os.listdir(converted))
    assert exit_status(hub.main, [str(model_dir), REPO_ID, "--dry-run", "--out", str(converted), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out {converted}: not empty and not written by gsva-push (no .gsva-push file in it)" in err
    assert sorted(os.listdir(converted)) == before and (converted / "notes.txt").read_text() == "keep me"

    out = tmp_path / "layout"
    assert hub.main([str(model_dir), REPO_ID, "--dry-run", "--out", str(out)]) == 0
    assert (out / hub.PUSH_MARKER).is_file()
    (out / "stale.txt").write_text("from an earlier run")
    assert hub.main([str(model_dir), REPO_ID, "--dry-run", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / hub.PUSH_MARKER).is_file()


def card_results(folder):
    from huggingface_hub import ModelCard, metadata_load

    card = ModelCard.load(folder / "README.md")
    assert metadata_load(folder / "README.md")["model-index"] if card.data.eval_results else True
    return card, list(card.data.eval_results or [])


def test_synthetic_results_are_not_labelled_grefcoco(model_dir, tmp_path):
    """Eval JSONs of the synthetic task (detected from the images they scored, or from the bundled model they
    name) give the synthetic dataset type, a card that says what the model is, and the synthetic defaults."""
    from gsva_hf.data.synthetic import write_synthetic_grefcoco

    data = tmp_path / "data"
    write_synthetic_grefcoco(data, num_images={"train": 0, "val": 2, "testA": 0, "testB": 0})
    image = next((data / "refer_seg" / "images").rglob("*.png"))
    scored = {**EVAL, "images": [{"image": str(image), "targets": []}]}
    (tmp_path / "scored.json").write_text(json.dumps(scored))
    bundled = {**EVAL, "model": str(DEFAULT_MODEL)}
    (tmp_path / "bundled.json").write_text(json.dumps(bundled))
    for name, model in (("scored.json", model_dir), ("bundled.json", DEFAULT_MODEL)):
        out = tmp_path / f"repo-{name}"
        assert hub.main([str(model), REPO_ID, "--dry-run", "--out", str(out), "--eval-json", str(tmp_path / name)]) == 0
        card, results = card_results(out)
        assert results and {r.dataset_type for r in results} == {hub.SYNTHETIC_DATASET_TYPE}
        assert not any("grefcoco" in f"{r.dataset_type} {r.dataset_name}".lower() for r in results)
        assert hub.SYNTHETIC_TAG in card.data.tags
        assert "**A toy model, not a gRefCOCO model.**" in card.text and "parameters" in card.text
        assert (out / "example.png").is_file() and json.dumps(list(hub.SYNTHETIC_TARGETS)) in card_snippet(out)
        assert f"| {hub.SYNTHETIC_DATASET_NAME} | val |" in card.text

    # Said explicitly: the same JSON as a real gRefCOCO run, marked synthetic by the flag.
    (tmp_path / "plain.json").write_text(json.dumps(EVAL))
    out = tmp_path / "repo-flag"
    argv = [str(model_dir), REPO_ID, "--dry-run", "--out", str(out), "--eval-json", str(tmp_path / "plain.json")]
    assert hub.main([*argv, "--synthetic"]) == 0
    assert {r.dataset_type for r in card_results(out)[1]} == {hub.SYNTHETIC_DATASET_TYPE}


def test_bundled_model_card_says_what_it_is():
    from huggingface_hub import ModelCard

    card = ModelCard.load(DEFAULT_MODEL / "README.md")
    assert hub.SYNTHETIC_TAG in card.data.tags and not card.data.eval_results and not card.data.datasets
    assert "**A toy model, not a gRefCOCO model.**" in card.text
    assert f"model_id = {json.dumps(hub.BUNDLED_MODEL_ID)}" in card.text


def test_real_size_card_names_grefcoco_and_real_defaults(tmp_path):
    """A 7B card built from the gsva-7b preset on the meta device: size, training data, real defaults."""
    from huggingface_hub import ModelCard

    from configuration_gsva import GSVAConfig
    from modeling_gsva import GSVAForCausalLM

    config = GSVAConfig.from_pretrained(REPO / "configs" / "gsva-7b")
    with torch.device("meta"):
        parameters = sum(p.numel() for p in GSVAForCausalLM(config).parameters())
    assert 7.6e9 < parameters < 7.8e9  # LLaMA-7B + CLIP ViT-L + SAM ViT-H
    card = hub.build_card(
        "someone/gsva-7b-ft-gres", config.to_dict(), parameters, "float32", [("gRefCOCO", EVAL)], [], None,
        "apache-2.0", None, None, [], [], list(hub.REAL_TARGETS), False, True,
        training_data="GSVA's gRefCOCO fine-tuning (gsva-7b-ft-gres.bin of the original release)",
    )  # fmt: skip
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    (giou,) = [r for r in loaded.data.eval_results if r.metric_type == "giou"]
    assert (giou.dataset_type, giou.dataset_name, giou.metric_value) == ("grefcoco", "gRefCOCO", 61.23)
    assert hub.SYNTHETIC_TAG not in loaded.data.tags and "toy model" not in loaded.text
    assert f"{parameters / 1e9:.2f}B parameters. Training data: GSVA's gRefCOCO fine-tuning" in loaded.text
    snippet = re.findall(r"```python\n(.*?)```", loaded.text, flags=re.S)[0]
    assert 'Image.open("your_photo.jpg")' in snippet and "example.png" not in snippet
    assert not any(phrase in snippet for phrase in hub.SYNTHETIC_TARGETS)
