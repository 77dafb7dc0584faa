"""What every conversion shares: the error, checkpoint files read one tensor at a time, the planned
tensors and the report.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Buffers that older checkpoints saved but the model recomputes from its config.
DERIVED_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|embeddings\.position_ids|pixel_mean|pixel_std)$")
# Trainer side files that sit next to weights in checkpoint folders.
NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state|scaler)[^/]*\.(bin|pt|pth)$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
EXPECTED_FILE = "expected a torch.save file (.bin/.pt/.pth) or a .safetensors file of tensors"


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message names the tensors/ids and what was expected."""


def _listing(lines: Sequence[str], limit: int = 60) -> str:
    shown = [f"    {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"    ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _refuse_problems(title: str, groups: Sequence[tuple[Sequence[str], str]]) -> None:
    """Raise one ConversionError, `TITLE:` then `N WHAT:` and the entries of each non-empty group, so every
    problem of a conversion is named at once."""
    problems = [f"{len(lines)} {what}:\n{_listing(lines)}" for lines, what in groups if lines]
    if problems:
        raise ConversionError(f"{title}:\n" + "\n".join(problems))


def _shape(values) -> list[int]:
    return [int(v) for v in values]


def _expected_shapes(target) -> dict[str, tuple[int, ...]]:
    if isinstance(target, nn.Module):
        return {k: tuple(v.shape) for k, v in target.state_dict().items()}
    return {k: tuple(v) for k, v in target.items()}


class TensorStore:
    """Tensors of one checkpoint file or folder, read one at a time.

    torch files are opened with `weights_only=True` and memory-mapped, safetensors are read per tensor, so
    listing keys and shapes costs no memory and `release` drops a tensor once it has been converted.
    """

    def __init__(self, name: str):
        self.name = name
        self._where: dict[str, object] = {}
        self._torch: dict[Path, dict[str, torch.Tensor]] = {}
        self._safetensors: dict[Path, object] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def open(cls, path: str | Path) -> "TensorStore":
        path = Path(path)
        store = cls(str(path))
        if path.is_dir():
            files = store._folder_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise ConversionError(f"checkpoint {path} does not exist")
        for file in files:
            for key in store._file_keys(file):
                if key in store._where:
                    raise ConversionError(f"{path}: tensor {key!r} is stored twice ({store._where[key]} and {file})")
                store._where[key] = file
        if not store._where:
            raise ConversionError(f"{path}: no tensors found")
        return store

    @classmethod
    def from_state_dict(cls, name: str, state_dict: Mapping[str, torch.Tensor]) -> "TensorStore":
        """Wrap tensors already in memory (API use, tests)."""
        store = cls(name)
        marker = Path(f"<{name}>")
        store._torch[marker] = dict(state_dict)
        store._where = {key: marker for key in state_dict}
        return store

    @staticmethod
    def _folder_files(folder: Path) -> list[Path]:
        for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
            indexes = sorted(folder.glob(pattern))
            if indexes:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
                return sorted({folder / name for name in weight_map.values()})
        for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
            files = sorted(f for f in folder.glob(pattern) if not NOT_WEIGHTS.match(f.name))
            if files:
                return files
        raise ConversionError(f"{folder}: no *.safetensors, *.bin, *.pth or *.pt weight files")

    def _file_keys(self, file: Path) -> list[str]:
        if file.stat().st_size == 0:
            raise ConversionError(f"{file}: the file is empty (0 bytes); {EXPECTED_FILE} (was a download or copy cut short?)")
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as error:  # SafetensorError and friends: name the file and what it should be
                raise ConversionError(f"{file}: not a valid safetensors file ({error}); {EXPECTED_FILE}") from error
            self._safetensors[file] = handle
            return list(handle.keys())
        tensors = _load_torch_tensors(file)
        self._torch[file] = tensors
        return list(tensors)

    # ----------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        where = self._where[key]
        if where in self._safetensors:
            return tuple(self._safetensors[where].get_slice(key).get_shape())
        return tuple(self._torch[where][key].shape)

    def dtype(self, key: str) -> str:
        """The stored dtype, read without loading the tensor: torch names (`float16`, `int64`)."""
        where = self._where[key]
        if where in self._safetensors:
            name = self._safetensors[where].get_slice(key).get_dtype()
            return SAFETENSORS_DTYPES.get(name, name)
        return str(self._torch[where][key].dtype).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        where = self._where[key]
        if where in self._safetensors:
            return self._safetensors[where].get_tensor(key)
        if key not in self._torch[where]:
            raise RuntimeError(f"{self.name}: tensor {key!r} was already released")
        return self._torch[where][key]

    def release(self, key: str) -> None:
        """Forget a converted tensor so its memory (or mapped pages) can go."""
        where = self._where.get(key)
        if where in self._torch:
            self._torch[where].pop(key, None)


def _load_torch_tensors(file: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)`, memory-mapped when the file allows it, unwrapped to a flat tensor dict.

    Files torch cannot read are reported by what they look like: a zip archive torch cannot open is truncated
    or corrupt; anything that is neither a zip archive nor a pickle is not a PyTorch checkpoint at all.
    """
    with open(file, "rb") as handle:
        head = handle.read(8)
    zipped = head.startswith(b"PK\x03\x04")
    if not zipped and not head.startswith(b"\x80"):
        raise ConversionError(f"{file}: not a PyTorch checkpoint (it starts with {head!r}); {EXPECTED_FILE}")
    if not zipped:
        logger.warning("%s is not in the zip format that can be memory-mapped; loading it whole", file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as error:  # corrupt archives, cut pickles, pickled objects weights_only refuses
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if zipped and ("zip archive" in first or "central directory" in first or isinstance(error, EOFError)):
            raise ConversionError(
                f"{file}: truncated or corrupt (torch cannot read its zip archive: {first}); {EXPECTED_FILE} "
                "(download it again)"
            ) from error
        if isinstance(error, EOFError):
            raise ConversionError(f"{file}: truncated (the pickle ends early); {EXPECTED_FILE} (download it again)") from error
        raise ConversionError(f"{file}: torch.load(weights_only=True) failed ({type(error).__name__}: {first}); {EXPECTED_FILE}") from error
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                logger.info("%s: using the tensors under %r", file, wrapper)
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{file}: expected a dict of tensors; these entries are not tensors:\n{_listing(bad)}")
    return dict(obj)


@dataclass
class _Item:
    """One model tensor to produce: its shape (known before reading), how to make it, where it comes from."""

    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    origin: str
    uses: tuple[tuple[TensorStore, str], ...] = ()
    key: str = ""  # the source key, matched by --allow-unexpected


def _read_item(store: TensorStore, key: str) -> _Item:
    return _Item(store.shape(key), partial(store.get, key), f"{store.name}:{key}", ((store, key),), key)


@dataclass
class ConversionReport:
    """What a conversion did, for the log and the README stub."""

    output_dir: Path | None = None
    sources: list[str] = field(default_factory=list)
    loaded: int = 0
    lora: dict = field(default_factory=dict)
    token_ids: dict = field(default_factory=dict)
    added_rows: dict = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def summary(self) -> str:
        lines = [f"wrote {self.output_dir}" if self.output_dir else "conversion"]
        lines += [f"  source: {s}" for s in self.sources]
        lines.append(f"  tensors from checkpoints: {self.loaded}")
        if self.lora:
            lines.append(
                f"  LoRA merged into {self.lora['modules']} layers (r={self.lora['r']}, alpha={self.lora['alpha']})"
            )
        if self.token_ids:
            lines.append("  token ids: " + ", ".join(f"{k}={v}" for k, v in self.token_ids.items()))
        if self.added_rows:
            lines.append("  new embedding rows (mean of the existing rows): " + ", ".join(f"{k}={v}" for k, v in self.added_rows.items()))
        if self.fresh:
            lines.append(f"  freshly initialised: {len(self.fresh)} tensors ({', '.join(self.fresh[:6])}{' ...' if len(self.fresh) > 6 else ''})")
        if self.filled:
            lines.append(f"  filled from base checkpoints: {len(self.filled)} tensors")
        if self.dropped:
            lines.append(f"  dropped: {len(self.dropped)} source tensors ({', '.join(self.dropped[:4])}{' ...' if len(self.dropped) > 4 else ''})")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  peak RSS: {self.peak_rss_mb:.0f} MB")
        return "\n".join(lines)
