"""Building the GSVA folder from planned tensors: vocabulary rows, the config and processor, the strict
check (every model tensor provided, every source tensor used), filling a meta-device model and saving it.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import resource
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from configuration_gsva import GSVAConfig
from modeling_gsva import GSVAForCausalLM, build_text_hidden_fcs, current_key
from processing_gsva import IM_END_TOKEN, IM_START_TOKEN, REJ_TOKEN, SEG_TOKEN, GSVAProcessor

from ..cli import refuse_link, write_text_replacing
from ..export import save_folder, size_words
from .common import FLOAT_DTYPES, ConversionError, ConversionReport, _Item, _listing, _refuse_problems, _shape

logger = logging.getLogger(__name__)

# GSVA trains and evaluates with `--model_max_length 1024`, whatever the LLaVA base's tokenizer says (2048).
GSVA_MODEL_MAX_LENGTH = 1024


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


# The readers name GSVA tensors in the 0.1 layout (`language_model.model.*`, `sam.*`, ...); `_check` renames them
# with `current_key`, the legacy mapping `from_pretrained` applies. These prefixes undo it for pattern matching.
_LAYOUT_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."), ("model.", ""))


def _allowed_gsva(key: str, patterns: Sequence[str]) -> bool:
    """Whether a GSVA key matches `patterns` under its current name or its 0.1 name (`--allow-missing
    'language_model.model.layers.1.*'` and `'model.language_model.layers.1.*'` alike)."""
    if _allowed(key, patterns):
        return True
    for prefix, legacy in _LAYOUT_PREFIXES:
        if key.startswith(prefix):
            return _allowed(legacy + key[len(prefix) :], patterns)
    return False


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
    allowed missing tensors come from `fallback` (base checkpoints) when it has them, else a fresh init. The
    readers' keys (0.1 layout) are renamed to the model's with `current_key` here; messages name the model's.
    """
    targets = {current_key(key): item for key, item in targets.items()}
    fallback = {current_key(key): item for key, item in fallback.items()}
    plan, unexpected, mismatched, wrong_dtype = {}, [], [], []
    floating = {k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_floating_point()}
    for item in unmapped:
        if _allowed(item.key, allow_unexpected):
            report.dropped.append(f"{item.origin} (allowed unexpected)")
        else:
            unexpected.append(item.origin)
    for key, item in targets.items():
        if key not in expected:
            if _allowed(item.key, allow_unexpected) or _allowed_gsva(key, allow_unexpected):
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
        if not _allowed_gsva(key, allow_missing):
            missing.append(f"{key} {_shape(shape)}")
        elif key in fallback and fallback[key].shape == shape:
            plan[key] = fallback[key]
            report.filled.append(f"{key} <- {fallback[key].origin}")
        else:
            plan[key] = _fresh_item(model, key, seed)
            report.fresh.append(key)
    _refuse_problems("cannot convert", [
        (missing, "tensors of the GSVA model are missing from the checkpoint (--allow-missing PATTERN fills them from "
                  "the base checkpoints or initialises them fresh)"),
        (unexpected, "checkpoint tensors map to nothing (--allow-unexpected PATTERN drops them)"),
        (mismatched, "shape mismatches"),
        (wrong_dtype, "tensors of the wrong kind"),
    ])  # fmt: skip
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
    """Checked before any work, so a long conversion never ends on a refused folder; created when saving.

    Nothing is written through a symbolic link: the folder itself must not be one, and with --overwrite no entry
    inside it may be one (the savers open their files by name, so a link there would send a file elsewhere)."""
    output_dir = Path(output_dir)
    refuse_link(output_dir, "--output")
    if not output_dir.exists():
        return output_dir
    if not output_dir.is_dir():
        raise ConversionError(f"--output {output_dir} is a file, not a folder; give a new or empty folder")
    if any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"--output {output_dir}: folder not empty; pass --overwrite to write into it")
    for folder, dirs, files in os.walk(output_dir):
        for name in sorted(dirs + files):
            if (Path(folder) / name).is_symlink():
                raise ConversionError(
                    f"--output {output_dir}: {(Path(folder) / name).relative_to(output_dir)} is a symbolic link; "
                    "the conversion never writes through one: remove it or give an empty or new folder"
                )
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
    save_folder(model, processor, output_dir, max_shard_size)
    report.output_dir = output_dir
    report.token_ids = dict(processor.token_ids)
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _write_readme(output_dir, model.config, processor, report, title, sum(p.numel() for p in model.parameters()), training)
    logger.info("%s", report.summary())
    return report


def _write_readme(
    output_dir: Path, config: GSVAConfig, processor: GSVAProcessor, report: ConversionReport, title: str, parameters: int,
    training: str,
) -> None:
    """The folder's card: what it is (size, training), where it came from, how to load and publish it."""
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
    write_text_replacing(output_dir / "README.md", text)
