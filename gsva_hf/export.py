"""Writing a GSVA folder that loads with `trust_remote_code=True`: the weights, the processor and the code files.

The one place that knows which top-level files a folder ships for remote code and copies them (`save_folder`, used
by the checkpoint conversion and by `gsva-push`; `load_gsva` compares a folder's copies with the installed ones
through the same list), and that gives saved weight files the ordinary file mode (also for training's export).
"""

import importlib.util
import os
import re
import shutil
from pathlib import Path

# The top-level files a Hub repository ships for `trust_remote_code`; the ones present next to `modeling_gsva.py`
# are copied into every layout (adding a file here is all a new one needs).
REMOTE_CODE_FILES = ("configuration_gsva.py", "modeling_gsva.py", "processing_gsva.py", "pipeline_gsva.py")
CODE_DIR = Path(importlib.util.find_spec("modeling_gsva").origin).parent
CODE_FILES = tuple(name for name in REMOTE_CODE_FILES if (CODE_DIR / name).is_file())


def copy_code_files(folder: str | Path) -> list[str]:
    """Copy every remote-code file of this installation into `folder` (not only the ones `save_pretrained`
    follows imports to); returns their names."""
    folder = Path(folder)
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, folder / name)
    return list(CODE_FILES)


def code_files_differing(folder: str | Path, names=CODE_FILES) -> list[str]:
    """Of `names`, the files whose copy in `folder` is missing or differs from this installation's (a file this
    installation lacks counts as differing)."""
    folder = Path(folder)
    return [
        name for name in names
        if not (folder / name).is_file() or not (CODE_DIR / name).is_file()
        or (folder / name).read_bytes() != (CODE_DIR / name).read_bytes()
    ]  # fmt: skip


# The weight files transformers and peft write: `model.safetensors`, its shards, `adapter_model.safetensors`.
WEIGHT_FILE = re.compile(r"(adapter_)?model(-\d{5}-of-\d{5})?\.safetensors")


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(folder: str | Path) -> list[Path]:
    """Give the weight files just saved into `folder` the mode every other file gets (0666 less the umask:
    0644 under umask 022): safetensors writes a private temporary file (0600) and renames it. Only regular files
    with the names the savers write are touched, never a link. Returns the files changed."""
    mode = 0o666 & ~current_umask()
    changed = []
    for path in sorted(Path(folder).iterdir()):
        if WEIGHT_FILE.fullmatch(path.name) and not path.is_symlink() and path.is_file():
            os.chmod(path, mode)
            changed.append(path)
    return changed


def save_folder(model, processor, folder: str | Path, max_shard_size: str | int) -> None:
    """`save_pretrained` of the model (shards of `max_shard_size`) and the processor, weight files given the mode
    every other file gets, and the code files: a folder complete for `trust_remote_code`."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    give_umask_mode(folder)
    copy_code_files(folder)


def size_words(parameters: int) -> str:
    """7,063,085,061 -> "7.06B"; 1,631,048 -> "1.63M" (model cards and READMEs)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.2f}{unit}"
    return str(parameters)


__all__ = [
    "CODE_DIR",
    "CODE_FILES",
    "REMOTE_CODE_FILES",
    "code_files_differing",
    "copy_code_files",
    "give_umask_mode",
    "save_folder",
    "size_words",
]
