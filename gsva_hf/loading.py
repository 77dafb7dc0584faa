"""Strict loading of GSVA folders and Hub repositories for the project's commands.

`from_pretrained` fills a tensor the checkpoint lacks with a fresh random draw and only logs a warning, so a
folder missing one weight would segment with noise and exit 0. `load_gsva` refuses it, naming the folder and
the keys, and a model with a NaN or infinite weight (`NonFiniteError`, naming the tensors). It also decides
whose code runs: by default the installed project's classes, even when the folder ships `modeling_gsva.py`; the
folder's (or repository's) code only with `trust_remote_code=True`. `load_gsva_pinned` is how every command
loads: the same, and a Hub repository's code only at a pinned revision; `add_loading_arguments` gives its flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
# The model shipped with the package: every command's default --model, and what `refresh-bundled` rewrites.
BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "gsva-tiny-synthetic"
# Modules kept in full precision when the LLM is quantized: the mask path and what feeds it. transformers matches
# these from the start of a module's path, so the base's parts are named `model.*`; the 0.1 layout's names stay for a
# 0.1 folder loaded through its own code.
KEEP_PARTS = ["sam", "vision_tower", "multi_modal_projector", "text_hidden_fcs"]
KEEP_UNQUANTIZED = [f"model.{part}" for part in KEEP_PARTS] + ["lm_head", *KEEP_PARTS, "language_model.lm_head"]


class IncompleteCheckpointError(ValueError):
    """A checkpoint does not provide exactly the model's tensors; the message names the keys and the folder."""


def _listing(keys, limit: int = 20) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def check_loading_info(source: str, info: dict) -> None:
    """Raise unless `from_pretrained(..., output_loading_info=True)` reports every tensor loaded as saved."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing (would be drawn at random): {_listing(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected (the model has no such tensor): {_listing(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        shapes = [f"{key} (checkpoint {list(saved)}, model {list(wanted)})" for key, saved, wanted in sorted(info["mismatched_keys"])]
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if info.get("error_msgs"):
        problems.append(f"errors: {_listing(info['error_msgs'])}")
    if problems:
        raise IncompleteCheckpointError(
            f"{source}: the checkpoint does not match the GSVA model; " + "; ".join(problems)
            + ". Re-export or re-convert the folder (gsva-convert-to-hf names what its sources lack)."
        )


class NonFiniteError(ValueError):
    """Weights, losses or outputs hold NaN or infinity; the message names where (tensors, step and loss part, or
    image and slot). A ValueError, so the commands report it like any other refused input."""


def non_finite_tensors(named_tensors) -> tuple[list[str], int]:
    """Names of the floating-point tensors holding a NaN or an infinity (each marked nan/inf), and how many
    floating-point tensors were looked at. Integer and quantized (packed) tensors cannot hold either."""
    bad, count = [], 0
    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        count += 1
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            kinds = [kind for kind, found in (("nan", tensor.isnan().any()), ("inf", tensor.isinf().any())) if found]
            bad.append(f"{name} ({'/'.join(kinds)}: {int((~finite).sum())} of {tensor.numel()} values)")
    return bad, count


def check_finite_weights(model, source: str, shown: int = 5) -> None:
    """Raise `NonFiniteError` naming the first `shown` tensors and the count when any weight or buffer of `model`
    is NaN or infinite: such a model gives NaN scores that would read as decisions."""
    bad, count = non_finite_tensors(model.state_dict().items())
    if bad:
        raise NonFiniteError(
            f"{source}: {len(bad)} of {count} tensors hold NaN or infinite values: {_listing(bad, shown)}. "
            "The weights are broken (a diverged training run, or an overflow when cast to a smaller dtype); "
            "use an earlier checkpoint or another dtype."
        )


# safetensors element sizes in bytes; a header naming another dtype is refused.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# safetensors' own limit on the JSON header; a longer one is refused before it is read.
MAX_SAFETENSORS_HEADER = 100_000_000


class CheckpointFileError(ValueError):
    """A config.json or weight file is malformed or disagrees with itself; the message names the file and field."""


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a .safetensors file's header, read without loading any tensor.

    The header is untrusted: its length must fit the file and `MAX_SAFETENSORS_HEADER`, every entry must have a
    known dtype, a shape of non-negative ints and data offsets inside the file whose span equals the shape's size,
    so a header claiming terabytes is refused from the file's real size."""
    import json
    import math

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointFileError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
            length = int.from_bytes(prefix, "little")
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise CheckpointFileError(
                    f"{path}: the safetensors header claims {length} bytes, but the file has {size - 8} after the length "
                    f"field (and headers are at most {MAX_SAFETENSORS_HEADER})"
                )
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointFileError(f"{path}: cannot read the weight file: {error}") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointFileError(f"{path}: the safetensors header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r:.200}"
        if not isinstance(entry, dict):
            raise CheckpointFileError(f"{where}: expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointFileError(f"{where}: unknown dtype {dtype!r:.40}; expected one of {sorted(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointFileError(f"{where}: shape {shape!r:.80} is not a list of non-negative ints")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise CheckpointFileError(
                f"{where}: data_offsets {offsets!r:.80} do not lie within the file's {data_size} data bytes"
            )
        claimed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if claimed != offsets[1] - offsets[0]:
            raise CheckpointFileError(
                f"{where}: shape {shape} of {dtype} needs {claimed} bytes, but its data_offsets span {offsets[1] - offsets[0]}"
            )
        tensors[name] = (dtype, tuple(shape))
    return tensors


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files: the shards its index names (plain file names in the folder), or
    `model.safetensors`; empty when the folder holds none (e.g. only .bin weights, or a config-only preset)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
            raise CheckpointFileError(f"{index}: not a safetensors index (a JSON object with 'weight_map'): {error}") from error
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFileError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointFileError(f"{index}: shard {shard!r:.80} is not a plain file name in {folder}")
            if not (folder / shard).is_file():
                raise CheckpointFileError(f"{index}: shard {shard} is missing from {folder}")
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def read_config_file(path: str | Path):
    """A `GSVAConfig` from a config.json, checked before any model is built: a JSON object holding every
    sub-config, fields of the right types and sizes within `configuration_gsva.SIZE_LIMITS`. Every problem is a
    CheckpointFileError naming the file and the field."""
    import json

    from configuration_gsva import GSVAConfig, check_config_dict

    path = Path(path)
    try:
        config_dict = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointFileError(f"{path}: not a readable JSON config: {error}") from error
    try:
        check_config_dict(config_dict, str(path))
        if config_dict.get("model_type") != GSVAConfig.model_type:
            raise ValueError(f"{path}: field 'model_type' is {config_dict.get('model_type')!r:.40}; expected 'gsva'")
        return GSVAConfig.from_dict({**config_dict, "_name_or_path": str(path)})
    except CheckpointFileError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        message = str(error)
        raise CheckpointFileError(message if str(path) in message else f"{path}: {message}") from error


def check_weights_match_config(folder: str | Path, config) -> None:
    """Refuse (IncompleteCheckpointError) a folder whose safetensors headers do not hold exactly the tensors, with
    the shapes, that `config` builds (the model is built on the meta device, which allocates nothing); run before loading, so a config
    claiming more than the weights hold never allocates. Header names in the 0.1 layout are compared through
    the legacy key mapping `from_pretrained` applies (`current_key`); messages name the file's keys. Folders
    without safetensors weights are left to `check_loading_info`."""
    from modeling_gsva import GSVAForCausalLM, current_key

    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        return
    saved: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        for name, (_, shape) in read_safetensors_header(file).items():
            saved[current_key(name)] = (shape, name)
    with torch.device("meta"):
        model = GSVAForCausalLM(config)
    # Tied tensors (e.g. SAM's shared positional embedding) are saved under one of their names.
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    if model.is_composed:
        _check_composed_sizes(folder, saved, model, groups)
        return
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}
    info = {
        "missing_keys": [names[0] for names in groups.values() if not any(n in saved for n in names)],
        "unexpected_keys": [saved[name][1] for name in saved if name not in shapes],
        "mismatched_keys": [
            (saved[name][1], saved[name][0], shapes[name])
            for name in saved
            if name in shapes and saved[name][0] != shapes[name]
        ],
    }
    check_loading_info(str(folder), info)


def _check_composed_sizes(folder: Path, saved: dict, model, groups: dict) -> None:
    """A composed VLM's checkpoint names follow its family's own saved layout (transformers converts them on
    loading), so before loading only the sizes are compared: as many tensors and elements as the config builds.
    Names are then checked by `check_loading_info` on what `from_pretrained` reports."""
    state = model.state_dict(keep_vars=True)
    expected = sorted(tuple(state[names[0]].shape) for names in groups.values())
    found = sorted(shape for shape, _ in saved.values())
    if expected != found:
        count = lambda shapes: sum(int(torch.Size(shape).numel()) for shape in shapes)  # noqa: E731
        raise IncompleteCheckpointError(
            f"{folder}: the checkpoint does not match the GSVA model its config.json builds: it holds {len(found)} "
            f"tensors ({count(found):,} values) where the config builds {len(expected)} ({count(expected):,}); "
            "re-compose the folder (gsva-compose) or fix config.json"
        )


def check_gsva_folder(folder: str | Path) -> None:
    """Validate a local GSVA folder before building its model: config.json (`read_config_file`) and, where
    safetensors weights exist, their headers against it (`check_weights_match_config`)."""
    folder = Path(folder)
    config = read_config_file(folder / "config.json")
    check_weights_match_config(folder, config)


def _dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def from_pretrained_strictly(model_class, path, source: str, finite_source: str | None = None, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` refusing what a checkpoint does not give exactly as saved
    (missing, unexpected or mis-shaped tensors: `check_loading_info`) and non-finite weights
    (`check_finite_weights`, naming `finite_source` or `source`): the one strict load of every loader."""
    # Mismatched shapes come back in the loading info (instead of transformers' unnamed RuntimeError) to be named.
    model, info = model_class.from_pretrained(str(path), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    check_loading_info(source, info)
    check_finite_weights(model, finite_source or source)
    return model.eval()


def load_gsva(
    model_dir: str | Path,
    dtype: str | torch.dtype = "fp32",
    device: str = "cpu",
    load_in: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Model and processor from a local GSVA folder or a Hub repository id, refusing incomplete checkpoints.

    load_in: "4bit"/"8bit" quantizes only the language model (bitsandbytes, GPU).
    trust_remote_code: run the folder's/repository's `modeling_gsva.py` & co. through the Auto classes; without
        it the installed project's classes load the weights and the folder's code is never imported.
    revision: branch, tag or commit of a Hub repository (pin a commit when trusting remote code).
    An error of a Hub download (offline, no such repository or file) names the repository: `Hub repository ID: ...`.
    """
    if Path(model_dir).is_dir():
        return _load_gsva(model_dir, dtype, device, load_in, trust_remote_code, revision)
    try:
        return _load_gsva(model_dir, dtype, device, load_in, trust_remote_code, revision)
    except (OSError, ValueError) as error:
        message = str(error)
        if str(model_dir) in message:
            raise
        source = f"Hub repository {model_dir}" + (f" at {revision}" if revision else "")
        raise (OSError if isinstance(error, OSError) else ValueError)(f"{source}: {message}") from error


def _load_gsva(model_dir, dtype, device, load_in, trust_remote_code, revision):
    """`load_gsva`'s work; errors as the libraries raise them."""
    local = Path(model_dir)
    is_local = local.is_dir()
    if is_local:
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local}: no config.json there; give a folder saved by GSVA")
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hub repositories, but {local} is a local folder")
        source = str(local)
    elif local.exists() or str(model_dir).count("/") != 1 or str(model_dir).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{model_dir}: no such folder (and not a Hub repository id NAMESPACE/NAME)")
    else:
        source = f"Hub repository {model_dir}" + (f" at {revision}" if revision else "")
    if load_in not in (None, "4bit", "8bit"):
        raise ValueError(f"load_in must be '4bit', '8bit' or None, got {load_in!r}")
    if is_local:
        check_gsva_folder(local)
    else:
        from huggingface_hub import hf_hub_download

        read_config_file(hf_hub_download(str(model_dir), "config.json", revision=revision))

    if trust_remote_code:
        from transformers import AutoModelForCausalLM as model_class
        from transformers import AutoProcessor as processor_class
    else:
        from modeling_gsva import GSVAForCausalLM as model_class
        from processing_gsva import GSVAProcessor as processor_class

        if is_local:
            from .export import REMOTE_CODE_FILES, code_files_differing

            shipped = [name for name in REMOTE_CODE_FILES if (local / name).is_file()]
            # Code identical to the installed files changes nothing, so only a folder whose code differs is noted.
            differs = code_files_differing(local, shipped)
            if differs:
                print(
                    f"note: {local} ships its own {', '.join(differs)}; using the installed gsva-hf classes instead "
                    "(trust_remote_code=True / --trust-remote-code runs the folder's code)",
                    file=sys.stderr,
                )
    kwargs = {"dtype": _dtype(dtype), "revision": revision}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if load_in is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in == "4bit", load_in_8bit=load_in == "8bit", llm_int8_skip_modules=KEEP_UNQUANTIZED
        )
        kwargs["device_map"] = device
    model = from_pretrained_strictly(model_class, model_dir, source, **kwargs)
    if load_in is None:
        model = model.to(device)
    processor = processor_class.from_pretrained(str(model_dir), revision=revision, trust_remote_code=trust_remote_code)
    processor.check_config(model.config)
    return model, processor


def load_gsva_pinned(
    model_dir: str | Path,
    dtype: str = "fp32",
    device: str = "cpu",
    load_in: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """`load_gsva` as every command loads (installed classes unless `trust_remote_code`; strict weights), and a Hub
    repo's remote code only at a pinned `revision`, so the code that runs is the code that was read."""
    if trust_remote_code and revision is None and not Path(model_dir).is_dir():
        raise ValueError(f"--trust-remote-code with the Hub repo {model_dir}: pin the code with --revision COMMIT")
    return load_gsva(model_dir, dtype, device, load_in, trust_remote_code=trust_remote_code, revision=revision)


def add_loading_arguments(parser: argparse.ArgumentParser, underscores: bool = False) -> None:
    """`--trust-remote-code` and `--revision` for every command that loads a model (`underscores`: shown as
    `--trust_remote_code`, for commands whose flags use underscores; a `CommandParser` takes both spellings)."""
    parser.add_argument(
        "--trust_remote_code" if underscores else "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="run the model folder's own code files (modeling_gsva.py ...) instead of the installed classes",
    )
    parser.add_argument("--revision", help="Hub revision (commit) when --model is a repo id; required with --trust-remote-code")


class _DropPilFallbackNote(logging.Filter):
    """The project uses the PIL image processors on purpose (torchvision is not a dependency); transformers'
    note that it falls back to them says nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropPilFallbackNote())


__all__ = [
    "BUNDLED_MODEL",
    "from_pretrained_strictly",
    "DTYPES",
    "IncompleteCheckpointError",
    "NonFiniteError",
    "add_loading_arguments",
    "check_finite_weights",
    "check_loading_info",
    "load_gsva",
    "load_gsva_pinned",
    "non_finite_tensors",
]
