"""Strict loading of GSVA folders and Hub repositories for the project's commands.

`from_pretrained` fills a tensor the checkpoint lacks with a fresh random draw and only logs a warning, so a
folder missing one weight would segment with noise and exit 0. `load_gsva` refuses it, naming the folder and
the keys. It also decides whose code runs: by default the installed project's classes, even when the folder
ships `modeling_gsva.py`; the folder's (or repository's) code only with `trust_remote_code=True`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
# Modules kept in full precision when the LLM is quantized: the mask path and what feeds it.
KEEP_UNQUANTIZED = ["sam", "vision_tower", "multi_modal_projector", "text_hidden_fcs", "lm_head"]


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


def _dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


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
    """
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

    if trust_remote_code:
        from transformers import AutoModelForCausalLM as model_class
        from transformers import AutoProcessor as processor_class
    else:
        from modeling_gsva import GSVAForCausalLM as model_class
        from processing_gsva import GSVAProcessor as processor_class

        if is_local:
            from gsva_hf.hub import REMOTE_CODE_FILES

            installed = Path(__file__).resolve().parents[1]
            shipped = [name for name in REMOTE_CODE_FILES if (local / name).is_file()]
            # Code identical to the installed files changes nothing, so only a folder whose code differs is noted.
            differs = [n for n in shipped if not (installed / n).is_file() or (local / n).read_bytes() != (installed / n).read_bytes()]
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
    # Mismatched shapes come back in the loading info (instead of transformers' unnamed RuntimeError) to be named.
    model, info = model_class.from_pretrained(
        str(model_dir), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    check_loading_info(source, info)
    model = model.eval()
    if load_in is None:
        model = model.to(device)
    processor = processor_class.from_pretrained(str(model_dir), revision=revision, trust_remote_code=trust_remote_code)
    processor.check_config(model.config)
    return model, processor


__all__ = ["IncompleteCheckpointError", "check_loading_info", "load_gsva"]
