"""GSVA folders to train from: LLaVA (original layout or transformers Llava) + SAM (+ CLIP when LLaVA lacks
it), or a randomly initialised preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from modeling_gsva import GSVAForCausalLM, current_key

from .assembly import (
    _apply_rows,
    _check,
    _materialise,
    _prepare_output,
    _save,
    _text_hidden_fcs_items,
    _vocabulary_items,
)
from .common import DERIVED_BUFFERS, ConversionError, ConversionReport, _expected_shapes, _read_item
from .llava import (
    _base_llava_items,
    _clip_store,
    _clip_target,
    _default_image_token,
    base_tokenizer,
    gsva_for_base,
    load_llava_base,
)
from .sam import _sam_store_and_config


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

    out_dim = sam_config.prompt_encoder_config.hidden_size
    config, processor, model = gsva_for_base(
        base, vision_tower, sam_config, tokenizer, image_token, conv_template,
        projector_type=projector_type, vocab_size=vocab_size, out_dim=out_dim,
    )
    fresh = _text_hidden_fcs_items(config.text_config.hidden_size, out_dim, seed)
    targets.update(fresh)
    report.fresh += [current_key(key) for key in fresh]
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
