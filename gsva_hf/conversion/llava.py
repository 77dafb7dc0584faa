"""LLaVA: a v1 folder in the original layout or a transformers Llava folder, its CLIP vision tower, the key
maps of the original LLaVA / LISA / GSVA models, and the base tokenizer with the GSVA tokens.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from processing_gsva import GSVAProcessor

from .assembly import _gsva_config, _meta_model, build_processor
from .common import DERIVED_BUFFERS, ConversionError, ConversionReport, TensorStore, _Item, _read_item
from .lora import unwrap_peft

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


def _default_image_token(tokenizer) -> str:
    """`<im_patch>` where the LLaVA v1 tokenizer has it (7B: no new row, as gsva-7b), else `<image>`."""
    vocab = tokenizer.get_vocab()
    return "<im_patch>" if "<im_patch>" in vocab else "<image>"


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


def _vision_name(base: LlavaBase, vision_tower: str | None) -> str:
    name = vision_tower or base.vision_name
    if not name:
        raise ConversionError(f"{base.path}/config.json names no mm_vision_tower; pass --vision-tower with a CLIP folder")
    return name


def gsva_for_base(
    base: LlavaBase, vision_tower: str | None, sam_config, tokenizer, image_token: str, conv_template: str | None, *,
    projector_type: str, vocab_size: int, out_dim: int,
):
    """The GSVA config, processor and meta-device model for `base`'s language model and feature settings, its
    CLIP (or `vision_tower`'s) and `sam_config`: the same assembly for a release and for bases."""
    vision_config = base.vision_config or clip_vision_config(_vision_name(base, vision_tower))
    config = _gsva_config(
        base.text_config, vision_config, sam_config, projector_type=projector_type,
        vision_feature_layer=base.vision_feature_layer, vision_feature_select_strategy=base.vision_feature_select_strategy,
        tokenizer=tokenizer, image_token=image_token, vocab_size=vocab_size, out_dim=out_dim,
    )
    processor = build_processor(tokenizer, config, _conv_template(base, conv_template), image_token)
    return config, processor, _meta_model(config)
