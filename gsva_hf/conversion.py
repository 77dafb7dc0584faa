"""Checkpoint conversion to GSVA folders that `GSVAForCausalLM.from_pretrained` loads.

Sources:
1. a released GSVA / LISA checkpoint (DeepSpeed `zero_to_fp32` dump of the PEFT-wrapped original model, LoRA
   unmerged) plus the LLaVA base it was trained from (config and tokenizer);
2. bases for training from scratch: LLaVA v1 in its original layout or a transformers Llava folder, plus SAM as
   the official segment-anything `.pth` or a transformers `SamModel` folder, plus CLIP when LLaVA lacks it;
3. a random preset (`tiny`).

The original loader used `strict=False` and never looked at the result, so here every source tensor is mapped
or reported and every model tensor is provided or reported; the run fails unless the user names what to allow.
Tensors are read one at a time (torch files memory-mapped, safetensors on demand) into a model whose
parameters start on the meta device, so a conversion holds about one copy of the model.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import re
import resource
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from configuration_gsva import GSVAConfig
from modeling_gsva import GSVAForCausalLM, build_text_hidden_fcs
from processing_gsva import IM_END_TOKEN, IM_START_TOKEN, REJ_TOKEN, SEG_TOKEN, GSVAProcessor

logger = logging.getLogger(__name__)

PEFT_PREFIXES = ("base_model.model.", "module.")
# Buffers that older checkpoints saved but the model recomputes from its config.
DERIVED_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|embeddings\.position_ids|pixel_mean|pixel_std)$")
# Trainer side files that sit next to weights in checkpoint folders.
NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state|scaler)[^/]*\.(bin|pt|pth)$")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?P<adapter>[^.]+)\.weight$")
CLIP_PRESETS = {
    "openai/clip-vit-large-patch14": 224,
    "openai/clip-vit-large-patch14-336": 336,
}
LLAMA_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "head_dim",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
SAM_VARIANTS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
EXPECTED_FILE = "expected a torch.save file (.bin/.pt/.pth) or a .safetensors file of tensors"
# GSVA trains and evaluates with `--model_max_length 1024`, whatever the LLaVA base's tokenizer says (2048).
GSVA_MODEL_MAX_LENGTH = 1024


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message names the tensors/ids and what was expected."""


def _listing(lines: Sequence[str], limit: int = 60) -> str:
    shown = [f"    {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"    ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _shape(values) -> list[int]:
    return [int(v) for v in values]


# ======================================================================================================== stores
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


# ======================================================================================================== plan items
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


# ======================================================================================================== SAM
_SAM_RENAMES = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^vision_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^vision_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^vision_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^vision_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^vision_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_SAM_MLP = re.compile(r"^mask_decoder\.(?P<mlp>output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
SAM_POSITIONAL_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
HF_SAM_POSITIONAL_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")


def sam_rename_plan(keys: Iterable[str]) -> dict[str, list[str]]:
    """segment-anything `Sam` keys → transformers `SamModel` keys (a list: the positional matrix is shared).

    An empty list means the tensor is a derived buffer (`pixel_mean/std`). Keys that follow no known pattern
    keep their (renamed) name; the caller's strict check then reports them.
    """
    keys = list(keys)
    depths: dict[str, int] = {}
    for key in keys:
        match = _SAM_MLP.match(key)
        if match:
            depths[match["mlp"]] = max(depths.get(match["mlp"], 0), int(match["i"]) + 1)
    plan = {}
    for key in keys:
        if key in ("pixel_mean", "pixel_std"):
            plan[key] = []
            continue
        if key == SAM_POSITIONAL_KEY:
            plan[key] = list(HF_SAM_POSITIONAL_KEYS)
            continue
        match = _SAM_MLP.match(key)
        if match:
            index, last = int(match["i"]), depths[match["mlp"]] - 1
            layer = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            plan[key] = [f"mask_decoder.{match['mlp']}.{layer}.{match['rest']}"]
            continue
        renamed = key
        for pattern, replacement in _SAM_RENAMES:
            renamed = re.sub(pattern, replacement, renamed)
        plan[key] = [renamed]
    return plan


def _expected_shapes(target) -> dict[str, tuple[int, ...]]:
    if isinstance(target, nn.Module):
        return {k: tuple(v.shape) for k, v in target.state_dict().items()}
    return {k: tuple(v) for k, v in target.items()}


def convert_sam_state_dict(
    state_dict: Mapping[str, torch.Tensor], target: nn.Module | Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Official segment-anything state dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) →
    transformers `SamModel` state dict, strictly checked against `target` (a `SamModel`, possibly on the meta
    device, or a key → shape mapping).

    Raises `ConversionError` listing source keys that map to nothing, model keys left missing and shape
    mismatches, so a partly loaded SAM can never pass silently.
    """
    expected = _expected_shapes(target)
    plan = sam_rename_plan(state_dict)
    converted, unmapped, mismatched = {}, [], []
    for key, targets in plan.items():
        for name in targets:
            if name not in expected:
                unmapped.append(f"{key} (would be {name})")
            elif tuple(state_dict[key].shape) != expected[name]:
                mismatched.append(f"{key} -> {name}: checkpoint {_shape(state_dict[key].shape)}, model expects {_shape(expected[name])}")
            else:
                converted[name] = state_dict[key]
    produced = {name for targets in plan.values() for name in targets}
    missing = [f"{k} {_shape(v)}" for k, v in expected.items() if k not in produced]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint tensors map to no SamModel key:\n{_listing(unmapped)}")
    if missing:
        problems.append(f"{len(missing)} SamModel tensors are missing from the checkpoint:\n{_listing(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches:\n{_listing(mismatched)}")
    if problems:
        raise ConversionError("SAM state dict does not fit the model:\n" + "\n".join(problems))
    return converted


def sam_config_from_shapes(shapes: Mapping[str, Sequence[int]], decoder_heads: int = 8):
    """transformers `SamConfig` matching a segment-anything checkpoint, read off its tensor shapes.

    Head counts are not stored in tensors: the vision heads come from the relative-position tables (their width
    is the head size), the decoder's from `decoder_heads` (8 in every official SAM). The decoder's LayerNorm eps
    is segment-anything's 1e-5; transformers' default 1e-6 shifts mask logits by ~1e-4.
    """
    from transformers import SamConfig

    def need(*keys):
        for key in keys:
            if key in shapes:
                return tuple(shapes[key])
        raise ConversionError(f"cannot infer the SAM configuration: tensor {' or '.join(map(repr, keys))} is missing")

    patch_weight = need("image_encoder.patch_embed.proj.weight")
    hidden, patch = patch_weight[0], patch_weight[2]
    depth = len({k.split(".")[2] for k in shapes if k.startswith("image_encoder.blocks.")})
    pos_embed = shapes.get("image_encoder.pos_embed")
    grid = None if pos_embed is None else pos_embed[1]
    if "image_encoder.blocks.0.attn.rel_pos_h" not in shapes:
        raise ConversionError(
            "cannot infer the SAM attention layout from a checkpoint without relative-position tables "
            "(image_encoder.blocks.*.attn.rel_pos_h); convert it from a transformers SamModel folder instead"
        )
    head_dim = need("image_encoder.blocks.0.attn.rel_pos_h")[1]
    sizes = [(need(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
    if grid is None:
        grid = max(sizes)
    global_layers = [i for i, size in enumerate(sizes) if size == grid]
    windows = {size for size in sizes if size != grid}
    if len(windows) > 1:
        raise ConversionError(f"SAM blocks use several window sizes {sorted(windows)}; transformers' SamModel supports one")
    vision = dict(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch,
        patch_size=patch,
        output_channels=need("image_encoder.neck.0.weight")[0],
        mlp_dim=need("image_encoder.blocks.0.mlp.lin1.weight")[0],
        mlp_ratio=need("image_encoder.blocks.0.mlp.lin1.weight")[0] / hidden,
        window_size=windows.pop() if windows else 0,
        global_attn_indexes=global_layers,
        use_rel_pos=True,
        use_abs_pos=pos_embed is not None,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in shapes,
        num_pos_feats=need(SAM_POSITIONAL_KEY)[1],
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    prompt_hidden = need("prompt_encoder.no_mask_embed.weight")[1]
    for key in ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"):
        shape = shapes.get(key)
        if shape is not None and (len(shape) != 2 or shape[1] != prompt_hidden):
            rows = shape[0] if len(shape) == 2 else "n"
            raise ConversionError(
                f"SAM tensor {key} has shape {_shape(shape)}, expected [{rows}, {prompt_hidden}] (the width of "
                "prompt_encoder.no_mask_embed.weight: SAM's prompt encoder and mask decoder share it)"
            )
    prompt = dict(
        hidden_size=prompt_hidden,
        image_size=grid * patch,
        patch_size=patch,
        mask_input_channels=need("prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=len({k.split(".")[2] for k in shapes if k.startswith("prompt_encoder.point_embeddings.")}),
    )
    decoder_layers = len({k.split(".")[3] for k in shapes if k.startswith("mask_decoder.transformer.layers.")})
    decoder = dict(
        hidden_size=need("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight")[1],
        mlp_dim=need("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_hidden_layers=decoder_layers,
        num_attention_heads=decoder_heads,
        attention_downsample_rate=prompt_hidden // need("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0],
        num_multimask_outputs=need("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=len({k.split(".")[3] for k in shapes if k.startswith("mask_decoder.iou_prediction_head.layers.")}),
        iou_head_hidden_dim=need("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        layer_norm_eps=1e-5,  # segment-anything's two-way transformer: nn.LayerNorm default (transformers: 1e-6)
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


# ======================================================================================================== LoRA / PEFT
def _strip_prefixes(keys: list[str]) -> str:
    """The PEFT / DeepSpeed prefix every key carries (`base_model.model.`, `module.`), or ""."""
    prefix = ""
    while True:
        rest = [k[len(prefix):] for k in keys]
        for candidate in PEFT_PREFIXES:
            if rest and all(k.startswith(candidate) for k in rest):
                prefix += candidate
                break
        else:
            return prefix


def unwrap_peft(
    store: TensorStore, *, lora_r: int | None, lora_alpha: float, report: ConversionReport
) -> dict[str, _Item]:
    """Original (unwrapped) names → items, with LoRA merged as `W + (alpha / r) * B @ A` in float32.

    The rank is read from the `lora_A` tensors and must equal `lora_r`; alpha is not stored in tensors, so it
    comes from the caller (GSVA and LISA train with 16).
    """
    prefix = _strip_prefixes(store.keys())
    items: dict[str, _Item] = {}
    pairs: dict[str, dict[str, str]] = defaultdict(dict)
    adapters = set()
    for raw in store.keys():
        key = raw[len(prefix):]
        match = LORA_KEY.match(key)
        if match:
            pairs[match["module"]][match["part"]] = raw
            adapters.add(match["adapter"])
            continue
        if ".original_module." in key:
            report.dropped.append(f"{raw} (PEFT original_module, replaced by its modules_to_save copy)")
            continue
        key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key).replace(".base_layer.", ".")
        if DERIVED_BUFFERS.search(key):
            report.dropped.append(f"{raw} (derived buffer, recomputed)")
            continue
        if key in items:
            raise ConversionError(f"{store.name}: two tensors become {key!r} ({items[key].origin} and {raw})")
        items[key] = _read_item(store, raw)
    if not pairs:
        if lora_r is not None:
            raise ConversionError(
                f"{store.name}: --lora-r {lora_r} was given but the checkpoint holds no LoRA tensors "
                "(*.lora_A.*.weight / *.lora_B.*.weight); it is already merged: drop --lora-r"
            )
        return items
    if len(adapters) > 1:
        raise ConversionError(f"{store.name}: LoRA tensors of several adapters {sorted(adapters)}; expected one")
    problems, ranks = [], {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            have = next(iter(parts.values()))
            problems.append(f"{have}: its lora_{'B' if 'A' in parts else 'A'} partner is missing")
            continue
        base = items.get(module + ".weight")
        a_shape, b_shape = store.shape(parts["A"]), store.shape(parts["B"])
        if base is None:
            problems.append(f"{parts['A']}: no base weight {prefix}{module}.weight or {prefix}{module}.base_layer.weight")
            continue
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or (b_shape[0], a_shape[1]) != base.shape:
            problems.append(
                f"{parts['A']} {_shape(a_shape)} / {parts['B']} {_shape(b_shape)} do not fit the base weight "
                f"{_shape(base.shape)}: expected lora_A [r, {base.shape[1]}] and lora_B [{base.shape[0]}, r]"
            )
            continue
        ranks[module] = a_shape[0]
    if problems:
        raise ConversionError(f"{store.name}: broken LoRA tensors:\n{_listing(problems)}")
    found = Counter(ranks.values())
    if lora_r is None:
        raise ConversionError(
            f"{store.name}: the checkpoint holds unmerged LoRA tensors of rank {sorted(found)} "
            f"(e.g. {pairs[next(iter(ranks))]['A']}); pass --lora-r with the training rank (GSVA: 8 for 7B, 64 for "
            "13B) and --lora-alpha (GSVA: 16)"
        )
    wrong = [f"{pairs[m]['A']} {_shape(store.shape(pairs[m]['A']))}" for m, r in ranks.items() if r != lora_r]
    if wrong:
        raise ConversionError(
            f"{store.name}: --lora-r is {lora_r} but these LoRA tensors have rank {sorted(found)} "
            f"(expected lora_A of shape [{lora_r}, in_features]):\n{_listing(wrong)}"
        )
    scale = float(lora_alpha) / float(lora_r)
    for module, parts in pairs.items():
        base = items[module + ".weight"]
        items[module + ".weight"] = _Item(
            base.shape,
            partial(_merge_lora, base.make, partial(store.get, parts["A"]), partial(store.get, parts["B"]), scale),
            f"{base.origin} + LoRA (r={lora_r}, alpha={lora_alpha})",
            base.uses + ((store, parts["A"]), (store, parts["B"])),
            base.key,
        )
    report.lora = {"r": lora_r, "alpha": lora_alpha, "modules": len(pairs), "targets": sorted({m.rsplit(".", 1)[-1] for m in pairs})}
    return items


def _merge_lora(base: Callable, lora_a: Callable, lora_b: Callable, scale: float) -> torch.Tensor:
    return base().float() + scale * (lora_b().float() @ lora_a().float())


# ======================================================================================================== key maps
def _original_targets(key: str, sam_plan: dict[str, list[str]]) -> list[str] | None:
    """A key of the original LLaVA / LISA / GSVA model → GSVA keys (None: no rule applies)."""
    for old, new in (
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_tower.", "vision_tower."),
        ("model.text_hidden_fcs.", "text_hidden_fcs."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if key.startswith(old):
            return [new + key[len(old):]]
    if key.startswith("model.visual_model."):
        return ["sam." + name for name in sam_plan[key[len("model.visual_model."):]]]
    match = re.match(r"^model\.mm_projector\.(?:(?P<index>\d+)\.)?(?P<param>weight|bias)$", key)
    if match:
        layer = {None: "linear_1", "0": "linear_1", "2": "linear_2"}.get(match["index"])
        return None if layer is None else [f"multi_modal_projector.{layer}.{match['param']}"]
    if key.startswith("model.") and not key.startswith(("model.mm_projector.", "model.vision_tower.")):
        return ["language_model." + key]
    return None


def _hf_llava_target(key: str) -> str | None:
    """A key of a transformers `LlavaForConditionalGeneration` checkpoint (v4 or v5 naming) → GSVA key."""
    for pattern, replacement in (
        (r"^(?:model\.)?language_model\.model\.", "language_model.model."),
        (r"^language_model\.lm_head\.", "language_model.lm_head."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^(?:model\.)?vision_tower\.vision_model\.", "vision_tower."),
        (r"^(?:model\.)?vision_tower\.", "vision_tower."),
        (r"^(?:model\.)?multi_modal_projector\.", "multi_modal_projector."),
    ):
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _clip_target(key: str) -> str | None:
    """A key of a CLIP checkpoint (CLIPModel or CLIPVisionModel, any version) → GSVA key; None: text side."""
    if key.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale")):
        return None
    key = re.sub(r"^(?:model\.)?vision_model\.", "", key)
    return "vision_tower." + key


# ======================================================================================================== sources
@dataclass
class LlavaBase:
    """A LLaVA checkpoint folder: its language/vision configs, projector, tokenizer and (lazily) weights."""

    path: Path
    layout: str  # "original" (LLaVA repo) or "hf" (transformers Llava)
    raw_config: dict
    text_config: object
    vision_name: str | None
    vision_config: object | None
    vision_feature_layer: int
    vision_feature_select_strategy: str
    projector_type: str | None
    tokenizer: object
    _store: TensorStore | None = None

    def store(self) -> TensorStore:
        if self._store is None:
            self._store = TensorStore.open(self.path)
        return self._store

    def has_weights(self) -> bool:
        return any(self.path.glob(p) for p in ("*.safetensors", "*.bin", "*.pth", "*.pt"))


def load_llava_base(path: str | Path) -> LlavaBase:
    """Read a LLaVA v1 folder (original layout) or a transformers Llava folder; weights are opened on demand."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"LLaVA base {path}: no config.json")
    raw = json.loads(config_file.read_text())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # the tokenizer is required for the ids: name the folder
        raise ConversionError(f"LLaVA base {path}: cannot load its tokenizer: {_tokenizer_hint(path, error)}") from error
    if "text_config" in raw:
        config = AutoConfig.from_pretrained(str(path))
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ConversionError(f"LLaVA base {path}: vision_feature_layer {layer!r} must be one int for GSVA")
        if getattr(config, "projector_hidden_act", "gelu") != "gelu" or not getattr(config, "multimodal_projector_bias", True):
            raise ConversionError(
                f"LLaVA base {path}: projector_hidden_act={config.projector_hidden_act!r}, "
                f"multimodal_projector_bias={config.multimodal_projector_bias}; GSVA's mlp2x_gelu needs 'gelu' with bias"
            )
        return LlavaBase(
            path, "hf", raw, config.text_config, None, config.vision_config, layer,
            config.vision_feature_select_strategy, "mlp2x_gelu", tokenizer,
        )
    if "mm_vision_tower" not in raw and "mm_hidden_size" not in raw:
        raise ConversionError(
            f"LLaVA base {path}: config.json has neither text_config (transformers Llava) nor mm_vision_tower "
            "(original LLaVA); is this a LLaVA checkpoint?"
        )
    text = LlamaConfig(**{k: raw[k] for k in LLAMA_CONFIG_KEYS if raw.get(k) is not None})
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"LLaVA base {path}: mm_vision_select_feature {select!r} is not 'patch' or 'cls_patch'")
    projector = raw.get("mm_projector_type")
    if projector not in (None, "linear", "mlp2x_gelu"):
        raise ConversionError(f"LLaVA base {path}: mm_projector_type {projector!r}; GSVA supports linear and mlp2x_gelu")
    return LlavaBase(
        path, "original", raw, text, raw.get("mm_vision_tower"), None, int(raw.get("mm_vision_select_layer", -2)),
        "default" if select == "patch" else "full", projector, tokenizer,
    )


def _tokenizer_hint(path: Path, error: Exception) -> str:
    """The error, or what to install when a SentencePiece-only tokenizer meets a missing reader.

    transformers turns `tokenizer.model` into a fast tokenizer with `sentencepiece` and `protobuf`; without
    them it falls through to its tiktoken reader and reports that `tiktoken` is missing, which does not help.
    """
    import importlib

    if (path / "tokenizer.json").is_file() or not (path / "tokenizer.model").is_file():
        return str(error)
    missing = []
    for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if not missing:
        return str(error)
    return (
        f"it has only a SentencePiece tokenizer.model, which transformers reads with the packages sentencepiece "
        f"and protobuf; {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
        f"pip install {' '.join(missing)} (both come with `pip install gsva-hf`) [transformers said: {error}]"
    )


def clip_vision_config(name_or_path: str):
    """CLIP vision config from a local folder, the Hub cache, or the built-in OpenAI ViT-L/14 shapes."""
    from transformers import AutoConfig, CLIPVisionConfig

    from gsva_hf.presets import CLIP_VIT_L_14

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        if name_or_path in CLIP_PRESETS:
            settings = {k: v for k, v in CLIP_VIT_L_14.items() if k != "model_type"}
            return CLIPVisionConfig(**{**settings, "image_size": CLIP_PRESETS[name_or_path]})
        raise ConversionError(
            f"cannot read the CLIP config {name_or_path!r} ({error}); pass --vision-tower with a local CLIP folder"
        ) from error
    return config.vision_config if hasattr(config, "vision_config") else config


def _clip_store(name_or_path: str) -> TensorStore:
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as error:  # offline, unknown repo: name it and say what to pass
            raise ConversionError(
                f"cannot find CLIP weights {name_or_path!r} ({error}); pass --vision-tower with a local CLIP folder"
            ) from error
    return TensorStore.open(path)


def _sam_store_and_config(sam: str | Path, decoder_heads: int) -> tuple[dict[str, _Item], object, str]:
    """SAM from an official `.pth` (renamed) or a transformers SamModel folder → `sam.*` items and config."""
    from transformers import SamConfig

    path = Path(sam)
    if path.is_dir():
        config = SamConfig.from_pretrained(str(path))
        store = TensorStore.open(path)
        items = {"sam." + re.sub(r"^sam\.", "", k): _read_item(store, k) for k in store.keys()}
        first, second = ("sam." + k for k in HF_SAM_POSITIONAL_KEYS)
        if first in items and second not in items:
            items[second] = items[first]
        return items, config, f"SamModel folder {path}"
    store = TensorStore.open(path)
    shapes = {k: store.shape(k) for k in store.keys()}
    try:
        config = sam_config_from_shapes(shapes, decoder_heads)
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from error
    items = {}
    for key, targets in sam_rename_plan(store.keys()).items():
        for name in targets:
            items["sam." + name] = _read_item(store, key)
    return items, config, f"segment-anything checkpoint {path}"


# ======================================================================================================== tokens
def _add_tokens(tokenizer, tokens: Sequence[str]) -> None:
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def _default_image_token(tokenizer) -> str:
    """`<im_patch>` where the LLaVA v1 tokenizer has it (7B: no new row, as gsva-7b), else `<image>`."""
    vocab = tokenizer.get_vocab()
    return "<im_patch>" if "<im_patch>" in vocab else "<image>"


def _grow_rows(item: _Item, rows: int, fill: Sequence[int], mean_rows: int, what: str) -> _Item:
    """An embedding/lm_head item with `rows` rows; rows in `fill` get the mean of the first `mean_rows` rows."""

    def make():
        old = item.make()
        new = old.new_empty((rows, old.shape[1]))
        kept = min(rows, old.shape[0])
        new[:kept] = old[:kept]
        new[list(fill)] = old[:mean_rows].float().mean(0).to(old.dtype)
        return new

    return _Item((rows, item.shape[1]), make, f"{item.origin} ({what})", item.uses, item.key)


def _vocabulary_items(targets: dict[str, _Item]) -> tuple[int, int]:
    embed = targets.get("language_model.model.embed_tokens.weight")
    head = targets.get("language_model.lm_head.weight")
    if embed is None or head is None:
        name = "language_model.model.embed_tokens.weight" if embed is None else "language_model.lm_head.weight"
        raise ConversionError(f"the checkpoint has no {name} (model.embed_tokens.weight / lm_head.weight)")
    if embed.shape[0] != head.shape[0]:
        raise ConversionError(
            f"{embed.origin} has {embed.shape[0]} rows but {head.origin} has {head.shape[0]}; both must cover the vocabulary"
        )
    return embed.shape[0], embed.shape[1]


def _apply_rows(targets: dict[str, _Item], rows: int, fill: Sequence[int], mean_rows: int, what: str) -> None:
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if rows != targets[key].shape[0] or fill:
            targets[key] = _grow_rows(targets[key], rows, fill, mean_rows, what)


def release_tokenizer(base, rows: int, release_kind: str, image_token: str | None, origin: str):
    """The release's tokenizer: the LLaVA base one plus the tokens its training added, in the original order.

    GSVA added `[SEG]`, `[REJ]`, then `<im_start>`/`<im_end>`; LISA `[SEG]`, then `<im_start>`/`<im_end>` (no
    `[REJ]`). The embedding row count must equal that tokenizer's length; `[REJ]` (LISA) and the image token
    are then appended as new rows. Returns the tokenizer, the release kind and the ids that got new rows.
    """
    base_size = len(base)
    expectations = {}
    for kind, order in (("gsva", (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN)), ("lisa", (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN))):
        trial = copy.deepcopy(base)
        _add_tokens(trial, order)
        expectations[kind] = (len(trial), {t: trial.convert_tokens_to_ids(t) for t in order})
    if release_kind == "auto":
        matches = [k for k, (size, _) in expectations.items() if size == rows]
        release_kind = matches[0] if matches else "gsva"
    if expectations[release_kind][0] != rows:
        detail = "; ".join(
            f"a {k.upper()} release needs {n} rows ({', '.join(f'{t}={i}' for t, i in tid.items())})"
            for k, (n, tid) in expectations.items()
        )
        raise ConversionError(
            f"vocabulary mismatch: {origin} has {rows} rows, but the base tokenizer has {base_size} tokens, so {detail}. "
            "Use the LLaVA base the checkpoint was trained from."
        )
    tokenizer = copy.deepcopy(base)
    _add_tokens(tokenizer, (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN) if release_kind == "lisa" else (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN))
    GSVAProcessor.add_gsva_tokens(tokenizer, image_token or _default_image_token(base))
    return tokenizer, release_kind, _ids_from(tokenizer, rows)


def base_tokenizer(base: LlavaBase, rows: int, image_token: str | None, origin: str):
    """The LLaVA tokenizer plus the GSVA tokens; returns it and the ids whose rows are new (mean-initialised)."""
    size = len(base.tokenizer)
    padded = base.layout == "hf" and rows == base.text_config.vocab_size and rows > size
    if rows != size and not padded:
        raise ConversionError(
            f"vocabulary mismatch: {origin} has {rows} rows but the tokenizer of {base.path} has {size} tokens "
            f"(ids 0..{size - 1}); they must match"
        )
    tokenizer = copy.deepcopy(base.tokenizer)
    GSVAProcessor.add_gsva_tokens(tokenizer, image_token or _default_image_token(base.tokenizer))
    return tokenizer, _ids_from(tokenizer, size)


def _ids_from(tokenizer, first: int) -> dict[str, int]:
    """Tokens with id >= `first`, in id order: the ones that need new (or re-initialised) rows."""
    return dict(sorted(((t, i) for t, i in tokenizer.get_vocab().items() if i >= first), key=lambda pair: pair[1]))


def _conv_template(base: LlavaBase, conv_template: str | None) -> str:
    if conv_template:
        return conv_template
    name = f"{base.path.name} {base.raw_config.get('_name_or_path', '')}".lower()
    return "llava_llama_2" if re.search(r"llama[-_]?2", name) else "llava_v1"


def build_processor(tokenizer, config: GSVAConfig, conv_template: str, image_token: str) -> GSVAProcessor:
    """GSVA processor for a converted model: CLIP and SAM image processors at the model's input sizes, and
    GSVA's maximum length (the processor refuses longer conversations, naming the limit)."""
    from gsva_hf.presets import image_processors

    tokenizer.model_max_length = GSVA_MODEL_MAX_LENGTH
    clip, sam = image_processors(config.vision_config.image_size, config.sam_config.vision_config.image_size)
    processor = GSVAProcessor(
        clip, sam, tokenizer, conv_template=conv_template, image_token=image_token,
        num_image_tokens=config.num_image_tokens,
    )
    processor.check_config(config)
    return processor


# ======================================================================================================== assembly
def _meta_model(config: GSVAConfig) -> GSVAForCausalLM:
    """The model with parameters on the meta device (no memory) and computed buffers on the CPU."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return GSVAForCausalLM(config)
    except (ValueError, RuntimeError) as error:  # shapes read off the checkpoints that no model can have
        raise ConversionError(f"the checkpoints' shapes give a GSVA configuration that cannot be built: {error}") from error


def _allowed(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _fresh_item(model: GSVAForCausalLM, key: str, seed: int) -> _Item:
    """A freshly initialised tensor for `key`, as the nearest transformers model owning it initialises it."""
    from transformers import PreTrainedModel

    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    shape = tuple(module.state_dict(keep_vars=True)[name].shape)
    owner_path = module_path
    while owner_path and not isinstance(model.get_submodule(owner_path), PreTrainedModel):
        owner_path = owner_path.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model

    def make():
        clone = copy.copy(module)
        clone._parameters = {n: nn.Parameter(torch.zeros(p.shape)) for n, p in module._parameters.items()}
        clone._modules = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            owner._init_weights(clone)
        return clone._parameters[name].detach()

    return _Item(shape, make, f"fresh init ({type(owner).__name__} initialisation)")


def _text_hidden_fcs_items(text_width: int, out_dim: int, seed: int) -> dict[str, _Item]:
    """GSVA builds `text_hidden_fcs` after loading the LLM, so it has PyTorch's default init; same here, seeded."""

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_text_hidden_fcs(text_width, out_dim).state_dict()

    cache = {}

    def make(key):
        if not cache:
            cache.update(build())
        return cache.pop(key)

    shapes = {"0.0.weight": (text_width, text_width), "0.0.bias": (text_width,), "0.2.weight": (out_dim, text_width), "0.2.bias": (out_dim,)}
    return {f"text_hidden_fcs.{k}": _Item(s, partial(make, k), "fresh init (PyTorch default, as GSVA)") for k, s in shapes.items()}


def _check(
    targets: dict[str, _Item],
    unmapped: list[_Item],
    expected: dict[str, tuple[int, ...]],
    allow_missing: Sequence[str],
    allow_unexpected: Sequence[str],
    fallback: dict[str, _Item],
    model: GSVAForCausalLM,
    seed: int,
    report: ConversionReport,
) -> dict[str, _Item]:
    """Every model tensor provided and every source tensor used, or one error listing all that is not.

    `allow_unexpected` patterns match source keys (as stored, or as GSVA keys), `allow_missing` GSVA keys;
    allowed missing tensors come from `fallback` (base checkpoints) when it has them, else a fresh init.
    """
    plan, unexpected, mismatched, wrong_dtype = {}, [], [], []
    floating = {k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_floating_point()}
    for item in unmapped:
        if _allowed(item.key, allow_unexpected):
            report.dropped.append(f"{item.origin} (allowed unexpected)")
        else:
            unexpected.append(item.origin)
    for key, item in targets.items():
        if key not in expected:
            if _allowed(item.key, allow_unexpected) or _allowed(key, allow_unexpected):
                report.dropped.append(f"{item.origin} (allowed unexpected)")
            else:
                unexpected.append(f"{item.origin} (would be {key}, which the GSVA model does not have)")
        elif item.shape != expected[key]:
            mismatched.append(f"{key}: {item.origin} has {_shape(item.shape)}, the model expects {_shape(expected[key])}")
        else:
            plan[key] = item
            if key in floating:
                for store, source in item.uses:
                    if store.dtype(source) not in FLOAT_DTYPES:
                        wrong_dtype.append(
                            f"{key}: {store.name}:{source} holds {store.dtype(source)}, the model expects a floating-point tensor"
                        )
    missing = []
    for key, shape in expected.items():
        if key in targets:
            continue
        if not _allowed(key, allow_missing):
            missing.append(f"{key} {_shape(shape)}")
        elif key in fallback and fallback[key].shape == shape:
            plan[key] = fallback[key]
            report.filled.append(f"{key} <- {fallback[key].origin}")
        else:
            plan[key] = _fresh_item(model, key, seed)
            report.fresh.append(key)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensors of the GSVA model are missing from the checkpoint (--allow-missing PATTERN fills "
            f"them from the base checkpoints or initialises them fresh):\n{_listing(missing)}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint tensors map to nothing (--allow-unexpected PATTERN drops them):\n{_listing(unexpected)}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches:\n{_listing(mismatched)}")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} tensors of the wrong kind:\n{_listing(wrong_dtype)}")
    if problems:
        raise ConversionError("cannot convert:\n" + "\n".join(problems))
    return plan


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(key)


def _materialise(
    model: GSVAForCausalLM, plan: dict[str, _Item], dtype: torch.dtype, report: ConversionReport, allow_non_finite: bool = False
) -> None:
    """Fill the meta model tensor by tensor, releasing each source tensor after its last use.

    Tensors holding NaN or infinite values (also ones that overflow `dtype`) are listed and refused unless
    `allow_non_finite`, when they become a note of the report.
    """
    remaining = Counter(use for item in plan.values() for use in item.uses)
    non_finite = []
    for key, item in plan.items():
        tensor = item.make()
        if tuple(tensor.shape) != item.shape:
            raise ConversionError(f"{item.origin}: read shape {_shape(tensor.shape)}, listed as {_shape(item.shape)}")
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            non_finite.append(f"{key} ({item.origin}): {nan} NaN, {inf} inf of {tensor.numel()} values in {str(dtype).removeprefix('torch.')}")
        _assign(model, key, tensor.contiguous())
        report.loaded += bool(item.uses)
        for use in item.uses:
            remaining[use] -= 1
            if remaining[use] == 0:
                use[0].release(use[1])
    if non_finite:
        message = f"{len(non_finite)} tensors hold NaN or infinite values"
        if not allow_non_finite:
            raise ConversionError(f"{message} (--allow-non-finite converts them anyway):\n{_listing(non_finite)}")
        logger.warning("%s:\n%s", message, _listing(non_finite))
        report.notes.append(f"{message}: " + "; ".join(non_finite[:10]))
    model.tie_weights()
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ConversionError(f"internal error: tensors left unset after conversion:\n{_listing(left)}")
    model.eval()


def _gsva_config(
    text_config,
    vision_config,
    sam_config,
    *,
    projector_type: str,
    vision_feature_layer: int,
    vision_feature_select_strategy: str,
    tokenizer,
    image_token: str,
    vocab_size: int,
    out_dim: int,
) -> GSVAConfig:
    text = text_config.to_dict()
    text.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vocab = tokenizer.get_vocab()
    return GSVAConfig(
        vision_config=vision_config.to_dict(),
        text_config=text,
        sam_config=sam_config.to_dict(),
        projector_type=projector_type,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_token_id=vocab[image_token],
        seg_token_id=vocab[SEG_TOKEN],
        rej_token_id=vocab[REJ_TOKEN],
        im_start_token_id=vocab[IM_START_TOKEN],
        im_end_token_id=vocab[IM_END_TOKEN],
        out_dim=out_dim,
    )


def _prepare_output(output_dir: str | Path, overwrite: bool) -> Path:
    """Checked before any work, so a long conversion never ends on a refused folder; created when saving."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not overwrite)):
        raise ConversionError(f"output folder {output_dir} is not empty; pass --overwrite to write into it")
    return output_dir


def _save(
    model: GSVAForCausalLM,
    processor: GSVAProcessor,
    output_dir: Path,
    max_shard_size: str | int,
    report: ConversionReport,
    title: str,
    training: str,
) -> ConversionReport:
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    from gsva_hf.training import give_umask_mode

    give_umask_mode(output_dir)
    report.output_dir = output_dir
    report.token_ids = dict(processor.token_ids)
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from gsva_hf.hub import CODE_DIR, CODE_FILES

    for name in CODE_FILES:  # every remote-code file, not only the ones save_pretrained follows imports to
        shutil.copyfile(CODE_DIR / name, output_dir / name)
    _write_readme(output_dir, model.config, processor, report, title, sum(p.numel() for p in model.parameters()), training)
    logger.info("%s", report.summary())
    return report


def _write_readme(
    output_dir: Path, config: GSVAConfig, processor: GSVAProcessor, report: ConversionReport, title: str, parameters: int,
    training: str,
) -> None:
    """The folder's card: what it is (size, training), where it came from, how to load and publish it."""
    from gsva_hf.hub import size_words

    ids = ", ".join(f"`{k}`={v}" for k, v in report.token_ids.items())
    sources = "\n".join(f"- {s}" for s in report.sources) or "- random initialisation"
    notes = []
    if report.lora:
        notes.append(f"LoRA (r={report.lora['r']}, alpha={report.lora['alpha']}) merged into {report.lora['modules']} layers.")
    if report.added_rows:
        notes.append("New vocabulary rows (mean of the existing rows): " + ", ".join(f"`{k}`={v}" for k, v in report.added_rows.items()) + ".")
    if report.fresh:
        notes.append(f"{len(report.fresh)} tensors initialised fresh (e.g. `{report.fresh[0]}`).")
    notes += report.notes
    text = f"""---
library_name: transformers
tags:
- gsva
- referring-segmentation
- custom_code
---

# {title}

GSVA (CVPR 2024, generalized referring segmentation): LLaVA (CLIP vision tower + `{config.projector_type}` projector +
{config.text_config.model_type} language model) with a SAM mask decoder driven by `[SEG]` tokens; `[REJ]` marks absent targets.
{size_words(parameters)} parameters ({parameters:,}). Training: {training}.

Converted by `gsva_hf.convert_gsva_to_hf` from:

{sources}

```python
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/to/this/folder", trust_remote_code=True)
```

Token ids: {ids}. Conversation template: `{processor.conv_template}`; {processor.num_image_tokens} image tokens per image.
Maximum length: {processor.tokenizer.model_max_length} tokens (GSVA's `--model_max_length`); the processor raises on a longer conversation.
Weights: {str(config.dtype or 'float32').replace('torch.', '')}.

{chr(10).join(f'- {n}' for n in notes) if notes else ''}

The weights keep the licences of their sources (LLaMA/Vicuna, LLaVA, CLIP, SAM, GSVA/LISA); check them before sharing.
Evaluate with `eval_hf.py --model THIS_FOLDER`, then publish with `gsva-push THIS_FOLDER NAMESPACE/NAME --eval-json ...`.
"""
    (output_dir / "README.md").write_text(text)


# ======================================================================================================== entry points
def convert_release(
    checkpoint: str | Path,
    llava_base: str | Path,
    output_dir: str | Path,
    *,
    lora_r: int | None = None,
    lora_alpha: float = 16.0,
    release_kind: str = "auto",
    vision_tower: str | None = None,
    sam: str | None = None,
    image_token: str | None = None,
    conv_template: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    decoder_heads: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> ConversionReport:
    """A GSVA (`gsva-7b-*.bin`, ...) or LISA release → GSVA folder.

    `llava_base` gives the language-model config and tokenizer (weights only for `allow_missing` fallbacks);
    `vision_tower` the CLIP config when the base's `mm_vision_tower` cannot be resolved offline; `sam` is a
    variant name (`vit_h`) or checkpoint checked against the release's SAM shapes.
    """
    if release_kind not in ("auto", "gsva", "lisa"):
        raise ConversionError(f"release_kind must be auto, gsva or lisa, got {release_kind!r}")
    output_dir = _prepare_output(output_dir, overwrite)
    report = ConversionReport(sources=[f"release {checkpoint}", f"LLaVA base {llava_base} (config, tokenizer)"])
    base = load_llava_base(llava_base)
    store = TensorStore.open(checkpoint)
    items = unwrap_peft(store, lora_r=lora_r, lora_alpha=lora_alpha, report=report)

    sam_shapes = {k[len("model.visual_model."):]: v.shape for k, v in items.items() if k.startswith("model.visual_model.")}
    if not sam_shapes:
        raise ConversionError(f"{checkpoint}: no SAM tensors (model.visual_model.*); is this a GSVA/LISA release?")
    try:
        sam_config = sam_config_from_shapes(sam_shapes, decoder_heads)
    except ConversionError as error:
        raise ConversionError(f"{checkpoint} (model.visual_model.*): {error}") from error
    _check_sam_variant(sam, sam_config, decoder_heads)
    sam_plan = sam_rename_plan(sam_shapes)
    targets, unmapped = {}, []
    for key, item in items.items():
        names = _original_targets(key, sam_plan)
        if names is None:
            unmapped.append(item)
            continue
        if not names:
            report.dropped.append(f"{item.origin} (derived buffer, recomputed)")
        for name in names:
            targets[name] = item

    rows, _ = _vocabulary_items(targets)
    tokenizer, kind, new_ids = release_tokenizer(base.tokenizer, rows, release_kind, image_token, targets["language_model.model.embed_tokens.weight"].origin)
    image_token = image_token or _default_image_token(base.tokenizer)
    vocab_size = len(tokenizer)
    if new_ids:
        _apply_rows(targets, vocab_size, sorted(new_ids.values()), rows, "rows added")
        report.added_rows = new_ids
    report.notes.append(f"{kind.upper()} release; vocabulary {rows} rows in the checkpoint, {vocab_size} after conversion")

    projector_type = _projector_type(items, base)
    vision_config = base.vision_config or clip_vision_config(_vision_name(base, vision_tower))
    out_item = targets.get("text_hidden_fcs.0.2.weight")
    out_dim = out_item.shape[0] if out_item is not None else sam_config.prompt_encoder_config.hidden_size
    config = _gsva_config(
        base.text_config, vision_config, sam_config, projector_type=projector_type,
        vision_feature_layer=base.vision_feature_layer, vision_feature_select_strategy=base.vision_feature_select_strategy,
        tokenizer=tokenizer, image_token=image_token, vocab_size=vocab_size, out_dim=out_dim,
    )
    processor = build_processor(tokenizer, config, _conv_template(base, conv_template), image_token)
    model = _meta_model(config)
    expected = _expected_shapes(model)
    fallback = {}
    if allow_missing:
        fallback = _base_fallback(base, vision_tower, sam, decoder_heads, report)
    plan = _check(targets, unmapped, expected, allow_missing, allow_unexpected, fallback, model, seed, report)
    _materialise(model, plan, dtype, report, allow_non_finite)
    training = (
        f"as released in {Path(checkpoint).name} ({kind.upper()}, trained by its authors: see "
        + ("https://github.com/LeapLabTHU/GSVA" if kind == "gsva" else "https://github.com/dvlab-research/LISA")
        + "); this folder converts it and trains nothing"
    )
    return _save(model, processor, output_dir, max_shard_size, report, f"{Path(checkpoint).stem} (GSVA, transformers)", training)


def convert_bases(
    llava_base: str | Path,
    sam: str | Path,
    output_dir: str | Path,
    *,
    vision_tower: str | None = None,
    image_token: str | None = None,
    conv_template: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    decoder_heads: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> ConversionReport:
    """LLaVA (original layout or transformers Llava) + SAM (`.pth` or SamModel folder) → GSVA folder to train.

    The pretrained projector is kept (LISA's behaviour, not GSVA's re-initialisation); `text_hidden_fcs` is
    new; the tokenizer gets the GSVA tokens and the embeddings grow to match.
    """
    output_dir = _prepare_output(output_dir, overwrite)
    report = ConversionReport(sources=[f"LLaVA base {llava_base}"])
    base = load_llava_base(llava_base)
    targets, unmapped, projector_type = _base_llava_items(base, report)
    if not any(k.startswith("vision_tower.") for k in targets):
        name = vision_tower or base.vision_name
        if not name:
            raise ConversionError(f"{llava_base} has no vision tower weights and names no CLIP model; pass --vision-tower")
        clip = _clip_store(name)
        report.sources.append(f"CLIP {name}")
        for key in clip.keys():
            target = _clip_target(key)
            if target is None:
                report.dropped.append(f"{clip.name}:{key} (CLIP text side, unused by GSVA)")
            elif DERIVED_BUFFERS.search(key):
                report.dropped.append(f"{clip.name}:{key} (derived buffer, recomputed)")
            else:
                targets[target] = _read_item(clip, key)
    sam_items, sam_config, sam_name = _sam_store_and_config(sam, decoder_heads)
    report.sources.append(sam_name)
    for key, item in sam_items.items():
        if DERIVED_BUFFERS.search(key):
            report.dropped.append(f"{item.origin} (derived buffer, recomputed)")
        else:
            targets[key] = item

    rows, _ = _vocabulary_items(targets)
    tokenizer, new_ids = base_tokenizer(base, rows, image_token, targets["language_model.model.embed_tokens.weight"].origin)
    image_token = image_token or _default_image_token(base.tokenizer)
    vocab_size = max(rows, len(tokenizer))
    if new_ids:
        _apply_rows(targets, vocab_size, sorted(new_ids.values()), len(base.tokenizer), "rows added")
        report.added_rows = new_ids

    vision_config = base.vision_config or clip_vision_config(_vision_name(base, vision_tower))
    out_dim = sam_config.prompt_encoder_config.hidden_size
    config = _gsva_config(
        base.text_config, vision_config, sam_config, projector_type=projector_type,
        vision_feature_layer=base.vision_feature_layer, vision_feature_select_strategy=base.vision_feature_select_strategy,
        tokenizer=tokenizer, image_token=image_token, vocab_size=vocab_size, out_dim=out_dim,
    )
    processor = build_processor(tokenizer, config, _conv_template(base, conv_template), image_token)
    model = _meta_model(config)
    fresh = _text_hidden_fcs_items(config.text_config.hidden_size, out_dim, seed)
    targets.update(fresh)
    report.fresh += list(fresh)
    expected = _expected_shapes(model)
    plan = _check(targets, unmapped, expected, allow_missing, allow_unexpected, {}, model, seed, report)
    _materialise(model, plan, dtype, report, allow_non_finite)
    training = "none for segmentation yet: pretrained LLaVA and SAM weights, `text_hidden_fcs` freshly initialised (train with train_hf.py)"
    return _save(model, processor, output_dir, max_shard_size, report, f"GSVA base from {Path(llava_base).name} + SAM", training)


def write_random(
    output_dir: str | Path, preset: str = "tiny", *, seed: int = 0, max_shard_size: str | int = "5GB", overwrite: bool = False
) -> ConversionReport:
    """A randomly initialised preset model with its processor (tests, demos)."""
    from gsva_hf.presets import tiny_config, tiny_processor

    if preset != "tiny":
        raise ConversionError(f"--random supports the preset 'tiny', got {preset!r}")
    output_dir = _prepare_output(output_dir, overwrite)
    processor = tiny_processor()
    config = tiny_config(processor.token_ids, len(processor.tokenizer))
    processor.check_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GSVAForCausalLM(config).eval()
    report = ConversionReport(sources=[f"random init, preset {preset}, seed {seed}"])
    report.notes.append("every weight is randomly initialised")
    return _save(model, processor, output_dir, max_shard_size, report, f"GSVA {preset} (random)", "none: random weights")


# ======================================================================================================== helpers
def _projector_type(items: Mapping[str, object], base: LlavaBase) -> str:
    if "model.mm_projector.0.weight" in items:
        found = "mlp2x_gelu"
    elif "model.mm_projector.weight" in items:
        found = "linear"
    else:
        found = base.projector_type or "linear"
    if base.projector_type and base.projector_type != found:
        raise ConversionError(f"{base.path} says mm_projector_type {base.projector_type!r} but the weights hold a {found} projector")
    return found


def _base_llava_items(base: LlavaBase, report: ConversionReport) -> tuple[dict[str, _Item], list[_Item], str]:
    """A LLaVA checkpoint's tensors as GSVA items; SAM / text_hidden_fcs tensors belong to releases, not bases."""
    store = base.store()
    targets, unmapped = {}, []
    if base.layout == "hf":
        for key in store.keys():
            if DERIVED_BUFFERS.search(key):
                report.dropped.append(f"{store.name}:{key} (derived buffer, recomputed)")
                continue
            target = _hf_llava_target(key)
            if target is None:
                unmapped.append(_read_item(store, key))
            else:
                targets[target] = _read_item(store, key)
        return targets, unmapped, "mlp2x_gelu"
    items = unwrap_peft(store, lora_r=None, lora_alpha=16.0, report=report)
    for key, item in items.items():
        names = _original_targets(key, {})
        if names is None or key.startswith(("model.visual_model.", "model.text_hidden_fcs.")):
            unmapped.append(item)
            continue
        for name in names:
            targets[name] = item
    return targets, unmapped, _projector_type(items, base)


def _base_fallback(base: LlavaBase, vision_tower: str | None, sam: str | None, decoder_heads: int, report: ConversionReport) -> dict[str, _Item]:
    """Tensors the base checkpoints could provide for `--allow-missing` keys of a release."""
    fallback: dict[str, _Item] = {}
    if base.has_weights():
        fallback.update(_base_llava_items(base, ConversionReport())[0])
    name = vision_tower or base.vision_name
    if name and (vision_tower or Path(name).is_dir()):
        clip = _clip_store(name)
        for key in clip.keys():
            target = _clip_target(key)
            if target is not None:
                fallback.setdefault(target, _read_item(clip, key))
    if sam and sam not in SAM_VARIANTS:
        fallback.update(_sam_store_and_config(sam, decoder_heads)[0])
    return fallback


def _vision_name(base: LlavaBase, vision_tower: str | None) -> str:
    name = vision_tower or base.vision_name
    if not name:
        raise ConversionError(f"{base.path}/config.json names no mm_vision_tower; pass --vision-tower with a CLIP folder")
    return name


def _check_sam_variant(sam: str | None, inferred, decoder_heads: int) -> None:
    if not sam:
        return
    vision = inferred.vision_config
    if sam in SAM_VARIANTS:
        want = SAM_VARIANTS[sam]
        source = f"--sam {sam}"
    else:
        other = _sam_store_and_config(sam, decoder_heads)[1].vision_config
        want = (other.hidden_size, other.num_hidden_layers)
        source = f"--sam {sam}"
    if (vision.hidden_size, vision.num_hidden_layers) != want:
        raise ConversionError(
            f"the release's SAM image encoder has width {vision.hidden_size} and {vision.num_hidden_layers} blocks, "
            f"but {source} has width {want[0]} and {want[1]} blocks"
        )


__all__ = [
    "ConversionError",
    "ConversionReport",
    "TensorStore",
    "sam_rename_plan",
    "convert_sam_state_dict",
    "sam_config_from_shapes",
    "unwrap_peft",
    "load_llava_base",
    "clip_vision_config",
    "release_tokenizer",
    "base_tokenizer",
    "build_processor",
    "convert_release",
    "convert_bases",
    "write_random",
    "DTYPES",
]
