import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "gsva-tiny"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun rendezvous in tests running side by side)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_processor():
    from processing_gsva import GSVAProcessor

    return GSVAProcessor.from_pretrained(TINY)


@pytest.fixture(scope="session")
def tiny_config():
    from configuration_gsva import GSVAConfig

    return GSVAConfig.from_pretrained(TINY)


@pytest.fixture()
def tiny_model(tiny_config):
    from modeling_gsva import GSVAForCausalLM

    torch.manual_seed(0)
    return GSVAForCausalLM(copy.deepcopy(tiny_config)).eval()


@pytest.fixture()
def saved_tiny_folder(tiny_model, tiny_processor, tmp_path):
    """The random tiny model and its processor saved as a folder (code files, `auto_map`, weights)."""
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def card_snippet_lines(folder, targets) -> str:
    """What a model card's usage snippet prints for `folder`'s example image, computed in this process."""
    from PIL import Image

    from modeling_gsva import GSVAForCausalLM
    from processing_gsva import GSVAProcessor

    model = GSVAForCausalLM.from_pretrained(folder).eval()
    processor = GSVAProcessor.from_pretrained(folder)
    image = Image.open(Path(folder) / "example.png").convert("RGB")
    expected = model.segment(processor, image, targets=list(targets))[0]
    lines = [
        f"{t.phrase!r}: rejected={t.rejected}, mask pixels={int(t.mask.sum())}, score={t.score:.2f}" for t in expected.targets
    ]
    return "\n".join([expected.answer, *lines]) + "\n"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the slow tier (fresh processes, several processes)")


def pytest_collection_modifyitems(config, items):
    """The default run is the fast, in-process tier; `--full` (what CI runs) adds the tests marked slow."""
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def exit_status(main, argv) -> int:
    """A command's exit status, whether its `main` returns it or exits (argparse and usage errors exit)."""
    try:
        return main(argv)
    except SystemExit as ended:
        return ended.code
