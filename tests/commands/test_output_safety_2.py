"""The commands write nothing through a symbolic link (an output folder that is one, or one inside it), replace only
folders whose marker they wrote themselves, check every input before writing anything, and name the argument or
file in each refusal."""

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from gsva_hf import hub
from gsva_hf import segment as segment_command
from gsva_hf.convert_gsva_to_hf import main as convert_main
from gsva_hf.data import synthetic
from gsva_hf.loading import BUNDLED_MODEL
from tests.conftest import REPO

PHRASES = "the red circle; the cat"
TINY_TREE = ["--train", "1", "--val", "1", "--testA", "0", "--testB", "0", "--image-size", "48"]


def run(capsys, main, *argv):
    """A command's exit status and stderr, whether it returns the status or exits with it."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def never_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments were refused")


# ------------------------------------------------------------------------------------------ gsva-convert-to-hf
def test_convert_overwrite_never_writes_through_a_link_inside_the_output(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    afile = elsewhere / "afile"
    afile.write_text("the user's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(afile)
    code, err = run(capsys, convert_main, "--output", out, "--random", "--preset", "tiny", "--overwrite")
    assert code == 2 and "config.json is a symbolic link" in err and f"--output {out}" in err
    assert afile.read_text() == "the user's file" and sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_convert_refuses_a_linked_output_folder_and_names_a_file(tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, err = run(capsys, convert_main, "--output", link, "--random", "--preset", "tiny")
    assert code == 2 and f"--output {link} is a symbolic link (to {target})" in err
    assert not any(target.iterdir())

    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run(capsys, convert_main, "--output", afile, "--random")
    assert code == 2 and f"--output {afile} is a file, not a folder" in err and "not empty" not in err


# ------------------------------------------------------------------------------------------ gsva-segment
def test_segment_trusts_only_a_summary_it_marked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(segment_command, "load_gsva_pinned", never_load)
    picture = image(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text("the user's result")
    (out / "overlay.png").write_text("the user's overlay")
    (out / "summary.json").write_text(json.dumps({"files": ["result.json", "overlay.png"]}))
    code, err = run(capsys, segment_command.main, picture, PHRASES, "--out", out)
    assert code == 2 and "summary.json" in err and "did not write" in err and "new --out" in err
    assert (out / "result.json").read_text() == "the user's result"
    assert (out / "overlay.png").read_text() == "the user's overlay"


def test_segment_summary_carries_its_marker(tmp_path):
    out = segment_command.OutputFolder(tmp_path / "out", {"model": "m"})
    out.flush()
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["written_by"] == "gsva-segment" and written["format"] == segment_command.SUMMARY_FORMAT
    assert out.previous_files() == [tmp_path / "out" / "summary.json"]


def test_segment_refuses_a_linked_out_folder_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(segment_command, "load_gsva_pinned", never_load)
    picture = image(tmp_path / "a.png")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, err = run(capsys, segment_command.main, picture, PHRASES, "--out", link)
    assert code == 2 and f"--out {link} is a symbolic link (to {target})" in err
    assert not any(target.iterdir())


# ------------------------------------------------------------------------------------------ gsva-push
def test_push_refuses_a_linked_out_folder_even_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("modeling_gsva.GSVAForCausalLM.from_pretrained", never_load)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, err = run(capsys, hub.main, BUNDLED_MODEL, "user/x", "--dry-run", "--out", link)
    assert code == 2 and f"--out {link} is a symbolic link (to {target})" in err
    assert not any(target.iterdir())


def test_push_checks_the_example_image_before_writing_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("modeling_gsva.GSVAForCausalLM.from_pretrained", never_load)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "layout"
    code, err = run(capsys, hub.main, BUNDLED_MODEL, "user/x", "--dry-run", "--out", out, "--example-image", bad)
    assert code == 2 and f"--example-image {bad}" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ synthetic generator
def test_synthetic_hf_out_replaces_only_a_folder_it_wrote(tmp_path, capsys):
    users = tmp_path / "users_hf"
    (users / "train").mkdir(parents=True)
    (users / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (users / "train" / "state.json").write_text("the user's state")
    code, err = run(capsys, synthetic.main, "--out", tmp_path / "tree", *TINY_TREE, "--hf-out", users)
    assert code == 2 and f"--hf-out {users}" in err and "did not write" in err
    assert (users / "dataset_dict.json").read_text() == '{"splits": ["train"]}'
    assert (users / "train" / "state.json").read_text() == "the user's state"
    assert not (tmp_path / "tree").exists()  # refused before the tree is written

    forged = tmp_path / "forged_hf"
    forged.mkdir()
    (forged / "dataset_dict.json").write_text("mine")
    (forged / synthetic.HF_MANIFEST_NAME).write_text(json.dumps({"files": ["dataset_dict.json"]}))
    code, err = run(capsys, synthetic.main, "--out", tmp_path / "tree", *TINY_TREE, "--hf-out", forged)
    assert code == 2 and (forged / "dataset_dict.json").read_text() == "mine"

    ours = tmp_path / "hf"
    assert run(capsys, synthetic.main, "--out", tmp_path / "tree", *TINY_TREE, "--hf-out", ours)[0] is None
    assert (ours / "val" / "state.json").is_file() and (ours / synthetic.HF_MANIFEST_NAME).is_file()
    fewer = ["--train", "1", "--val", "0", "--testA", "0", "--testB", "0", "--image-size", "48"]
    assert run(capsys, synthetic.main, "--out", tmp_path / "tree", *fewer, "--hf-out", ours)[0] is None
    assert (ours / "train" / "state.json").is_file() and not (ours / "val").exists()


def test_synthetic_refuses_a_linked_hf_out_and_an_unwritable_out_in_one_line(tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, err = run(capsys, synthetic.main, "--out", tmp_path / "tree", *TINY_TREE, "--hf-out", link)
    assert code == 2 and f"--hf-out {link} is a symbolic link" in err and not any(target.iterdir())

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would go")
    code, err = run(capsys, synthetic.main, "--out", blocker / "data", *TINY_TREE)
    assert code == 2 and f"--out {blocker / 'data'}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ demo
@pytest.fixture()
def demo_app(monkeypatch):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
    spec = importlib.util.spec_from_file_location("gsva_demo_app_safety", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "load_gsva_pinned", never_load)
    return module


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--device", "cuda"], "--device cuda"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--threshold", "nan"], "--threshold must be a finite number"),
        (["--threshold", "inf"], "--threshold must be a finite number"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_demo_refuses_unusable_flags_in_one_line_before_loading(demo_app, argv, said, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run(capsys, demo_app.main, *argv)
    assert code == 2 and said in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ messages
def test_a_hub_load_error_names_the_repository(monkeypatch):
    import huggingface_hub

    from gsva_hf.loading import load_gsva_pinned

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"^Hub repository someone/gsva: cannot reach the Hub"):
        load_gsva_pinned("someone/gsva")


def test_a_datasets_spec_that_does_not_load_is_named(tmp_path):
    from gsva_hf.data.hf_datasets import load_hf_split

    missing = tmp_path / "nonexist"
    with pytest.raises(ValueError, match=re.escape(f"hf:{missing}|val: cannot load it")):
        load_hf_split(str(missing), "val")


def help_blocks(main, capsys) -> dict[str, str]:
    with pytest.raises(SystemExit):
        main(["--help"])
    blocks, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0]
            blocks[current] = ""
        if current:
            blocks[current] += " " + " ".join(line.split())
    return blocks


@pytest.mark.parametrize("main", [hub.main, convert_main, segment_command.main, synthetic.main])
def test_help_gives_each_default_once(main, capsys):
    blocks = help_blocks(main, capsys)
    assert blocks
    twice = {flag: text for flag, text in blocks.items() if len(re.findall(r"\(default[ :]", text)) > 1}
    assert not twice
