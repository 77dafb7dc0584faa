"""PEFT-wrapped checkpoints (the original training's DeepSpeed dumps): prefixes stripped, PEFT's module
copies folded back and unmerged LoRA merged into its base weights.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from functools import partial
from typing import Callable

import torch

from .common import DERIVED_BUFFERS, ConversionError, ConversionReport, TensorStore, _Item, _listing, _read_item, _shape

PEFT_PREFIXES = ("base_model.model.", "module.")


LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?P<adapter>[^.]+)\.weight$")


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
