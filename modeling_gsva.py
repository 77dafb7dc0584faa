"""GSVA: generalized referring segmentation with a multimodal LLM (CVPR 2024), transformers-native.

LLaVA (CLIP vision tower, projector, causal LM) reads the image and the question and answers with one `[SEG]`
per present target and `[REJ]` per absent one. The last-layer hidden state at the position just before each
`[SEG]` goes through `text_hidden_fcs` and becomes one sparse prompt of SAM's mask decoder.

As in transformers' llava: `GSVAModel` (the base: the vision-language backbone and the mask decoder) and
`GSVAForCausalLM` (alias `GSVAForConditionalGeneration`; the head: `lm_head`, losses, generation, target mode).

Shipped with a Hub repository for ``trust_remote_code``: imports only torch, transformers and its sibling files.
"""

import copy
import inspect
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput, can_return_tuple

try:
    from .configuration_gsva import GSVAConfig
    from .processing_gsva import mask_input_size, upscale_slot_masks
except ImportError:
    from configuration_gsva import GSVAConfig
    from processing_gsva import mask_input_size, upscale_slot_masks

IGNORE_INDEX = -100
AUTO_MAP = {
    "AutoConfig": "configuration_gsva.GSVAConfig",
    "AutoModel": "modeling_gsva.GSVAModel",
    "AutoModelForCausalLM": "modeling_gsva.GSVAForCausalLM",
    "AutoModelForImageTextToText": "modeling_gsva.GSVAForCausalLM",
    "AutoProcessor": "processing_gsva.GSVAProcessor",
}
# The 0.1 layout (one class; `language_model` a causal LM with its head) -> base `model` + `lm_head`.
LEGACY_KEY_MAPPING = {
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
    r"^sam\.": "model.sam.",
    r"^text_hidden_fcs\.": "model.text_hidden_fcs.",
}
PIPELINE_FILE = "pipeline_gsva.py"
CUSTOM_PIPELINES = {
    "gsva-segmentation": {
        "impl": "pipeline_gsva.GSVASegmentationPipeline",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],
        "type": "multimodal",
    }
}
DICE_SCALE = 1000.0
# Processor outputs for its own post-processing, never read by the model.
PROCESSOR_ONLY_INPUTS = ("original_sizes", "reshaped_input_sizes")
# A composed VLM's image inputs from its processor (each family takes some): they go with the span that holds the
# image. Its per-token image flags (`mm_token_type_ids`, `token_type_ids`) are recomputed for each span fed.
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
TOKEN_TYPE_INPUTS = ("mm_token_type_ids", "token_type_ids")
DICE_EPS = 1e-6


@dataclass
class GSVAOutput(ModelOutput):
    r"""
    Output of `GSVAForCausalLM.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            `ce_loss + mask_bce_loss + mask_dice_loss`, each already multiplied by its config weight.
        ce_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Weighted next-token cross-entropy, mean over answer tokens.
        mask_bce_loss, mask_dice_loss (`torch.FloatTensor` of shape `()`, *optional*, with `gt_masks`):
            Weighted mask losses, normalised by the number of slots (`[REJ]` included).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Language-model logits.
        cache (`Cache`, *optional*, returned when `use_cache=True`):
            The decoder's key/value cache.
        hidden_states, attentions (`tuple(torch.FloatTensor)`, *optional*):
            The decoder's, when `output_hidden_states` / `output_attentions` are set.
        pred_masks (`torch.FloatTensor` of shape `(batch_size, num_slots, height, width)`, *optional*, with SAM inputs):
            SAM's low-resolution mask logits (float32), one per `[SEG]`/`[REJ]` slot in text order, rows padded to
            the longest; `[REJ]` and padding slots hold zeros (no prediction), as in GSVA's training.
            `processor.post_process_masks` brings them to the original image size.
        iou_scores (`torch.FloatTensor` of shape `(batch_size, num_slots)`, *optional*):
            SAM's predicted IoU for each slot (0 for `[REJ]` and padding).
        slot_is_seg (`torch.BoolTensor` of shape `(batch_size, num_slots)`, *optional*):
            Whether each slot's token is `[SEG]` (False for `[REJ]` and padding).
        slot_mask (`torch.BoolTensor` of shape `(batch_size, num_slots)`, *optional*):
            Which slots are real (True) rather than padding; a row's real slots come first.
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mask_bce_loss: torch.Tensor | None = None
    mask_dice_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    pred_masks: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None
    slot_is_seg: torch.Tensor | None = None
    slot_mask: torch.Tensor | None = None


@dataclass
class GSVAGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    `generate(..., return_dict_in_generate=True)` with SAM inputs: `GenerateDecoderOnlyOutput`'s fields
    (`sequences`, ...; `cache` is dropped) plus, per returned sequence:

    Args:
        answer_ids (`list[torch.LongTensor]`):
            The generated answer up to (not including) its end-of-sequence token.
        finished (`list[bool]`):
            Whether the row ended with end-of-sequence (False: cut at `max_new_tokens`).
        slot_is_seg, slot_mask (`torch.BoolTensor` of shape `(num_sequences, num_slots)`):
            Per `[SEG]`/`[REJ]` slot of the answer, in order, whether it is `[SEG]`; which slots are real.
        slot_scores (`torch.FloatTensor` of shape `(num_sequences, num_slots)`):
            The probability of that choice between the two tokens (softmax over their two logits).
        pred_masks (`torch.FloatTensor` of shape `(num_sequences, num_slots, height, width)`):
            SAM's low-resolution mask logits (zeros for `[REJ]` and padding).
        iou_scores (`torch.FloatTensor` of shape `(num_sequences, num_slots)`):
            SAM's predicted IoU (0 for `[REJ]` and padding).
    """

    answer_ids: list[torch.LongTensor] | None = None
    finished: list[bool] | None = None
    slot_is_seg: torch.Tensor | None = None
    slot_mask: torch.Tensor | None = None
    slot_scores: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None


@dataclass
class GSVATargetsOutput(ModelOutput):
    r"""
    Output of `GSVAForCausalLM.decide_targets`: one decided slot per asked phrase, in order.

    Args:
        sequences (`list[torch.LongTensor]`):
            Per row, the input tokens (padding removed) with each slot set to the decided token.
        slot_is_seg, slot_mask, slot_scores, pred_masks, iou_scores:
            As in `GSVAGenerateOutput`.
    """

    sequences: list[torch.LongTensor] | None = None
    slot_is_seg: torch.Tensor | None = None
    slot_mask: torch.Tensor | None = None
    slot_scores: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None


def pad_slots(values: list[torch.Tensor], fill=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row slot values `[n_i, ...]` as one `[B, max n_i, ...]` tensor (padding `fill`) and its slot mask."""
    count = max((len(v) for v in values), default=0)
    dense = values[0].new_full((len(values), count, *values[0].shape[1:]), fill)
    mask = torch.zeros((len(values), count), dtype=torch.bool, device=values[0].device)
    for row, value in enumerate(values):
        dense[row, : len(value)] = value
        mask[row, : len(value)] = True
    return dense, mask


class GSVAMultiModalProjector(nn.Module):
    """LLaVA v1 `linear` projector, or LLaVA-1.5 `mlp2x_gelu` (same parameter names as transformers' Llava)."""

    def __init__(self, config: GSVAConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_width, text_width)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_width, text_width)
        else:
            self.act = None
            self.linear_2 = None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)
        if self.linear_2 is not None:
            hidden = self.linear_2(self.act(hidden))
        return hidden


def build_text_hidden_fcs(text_width: int, out_dim: int) -> nn.ModuleList:
    """`Linear(d,d) - ReLU - Linear(d,out) - Dropout(0)`, laid out as GSVA's `text_hidden_fcs.0.{0,2}`."""
    return nn.ModuleList(
        [nn.Sequential(nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, out_dim), nn.Dropout(0.0))]
    )


def mask_bce_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over masks of the per-mask mean binary cross-entropy (GSVA's `sigmoid_ce_loss` times the mask count)."""
    if pred.shape[0] == 0:
        return pred.sum()
    per_pixel = F.binary_cross_entropy_with_logits(pred.float(), target.float(), reduction="none")
    return per_pixel.flatten(1).mean(1).sum()


def mask_dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over masks of GSVA's Dice loss (inputs scaled by 1/1000, eps 1e-6)."""
    if pred.shape[0] == 0:
        return pred.sum()
    prob = pred.float().sigmoid().flatten(1) / DICE_SCALE
    gt = target.float().flatten(1)
    numerator = 2 * (prob * gt).sum(-1)
    denominator = prob.sum(-1) + (gt / DICE_SCALE).sum(-1)
    return (1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)).sum()


class GSVAPreTrainedModel(PreTrainedModel):
    config: GSVAConfig
    config_class = GSVAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Renames from the 0.1 layout (one class, `language_model` a causal LM) to this class's keys; `from_pretrained`
    # applies them when the caller passes no `key_mapping`, so folders saved by 0.1 load strictly.
    _legacy_key_mapping: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, with `_legacy_key_mapping` as `key_mapping` when none is given; the renames are
        forgotten after loading, so `save_pretrained` writes the current layout."""
        legacy = "key_mapping" not in kwargs and bool(cls._legacy_key_mapping)
        if legacy and args and not isinstance(kwargs.get("config"), PreTrainedConfig):
            # Only LLaVA v1's layout had a 0.1 release; a composed VLM's checkpoint keeps its own key conversions.
            hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder") if k in kwargs}
            kwargs["config"] = cls.config_class.from_pretrained(args[0], **hub)
        if legacy and getattr(kwargs.get("config"), "vlm_config", None) is not None:
            legacy = False
        if legacy:
            kwargs["key_mapping"] = dict(cls._legacy_key_mapping)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        conversions = getattr(model, "_weight_conversions", None)
        if legacy and conversions:
            model._weight_conversions = [
                c for c in conversions if not set(getattr(c, "source_patterns", ())) & set(cls._legacy_key_mapping)
            ]
        return loaded


def current_key(key: str, mapping: dict[str, str] | None = None) -> str:
    """A checkpoint key in the layout `mapping` (default: the head's legacy mapping) renames it to; the same
    rules `from_pretrained` applies, for code that reads safetensors headers or builds state dicts."""
    for pattern, replacement in (LEGACY_KEY_MAPPING if mapping is None else mapping).items():
        renamed, count = re.subn(pattern, replacement, key, count=1)
        if count:
            return renamed
    return key


def map_embeddings(fn, embeddings):
    """`fn` applied to a mask decoder's image embeddings: one tensor (SAM) or a tuple of them (SAM-HQ, SAM 2)."""
    return fn(embeddings) if torch.is_tensor(embeddings) else tuple(fn(e) for e in embeddings)


def apply_init(module: nn.Module, init_fn, is_custom_code: bool) -> None:
    """transformers' `smart_apply` for one part: children first, each sub-model with its own init function."""
    for child in module.children():
        apply_init(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init_fn, is_custom_code)
    init_fn(module, is_custom_code)


@dataclass
class GSVAModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    Output of `GSVAModel.forward`, the vision-language backbone: the decoder's `last_hidden_state`
    `(batch_size, sequence_length, hidden_size)`, its `cache` (with `use_cache`), and `hidden_states` /
    `attentions` when asked for.
    """


class GSVAModel(GSVAPreTrainedModel):
    """GSVA's base: two parts behind small interfaces.

    - The vision-language backbone: LLaVA v1's layout (CLIP `vision_tower` + `multi_modal_projector` + the decoder
      `language_model`; `embed_inputs(input_ids, pixel_values)` puts visual tokens in place of the image tokens), or
      `vlm`, any transformers `AutoModelForImageTextToText` model used as it is (its LM head included, so its
      weight tying and generation stay its own). `forward` returns the decoder's last hidden states (and cache).
    - The mask decoder (SAM, SAM-HQ, SAM 2 or EdgeTAM `sam` + `text_hidden_fcs`): `get_sam_image_embeddings(
      sam_pixel_values)` encodes the image once, `masks_from_hidden_states(slot_states, sam_image_embeddings,
      decode)` turns `[SEG]` states into low-resolution mask logits and IoU scores.
    """

    _legacy_key_mapping = {r"^language_model\.model\.": "language_model."}

    def __init__(self, config: GSVAConfig, after_language_model=None):
        """`after_language_model(language_model)`: called once LLaVA v1's decoder is built (the head builds and
        initialises `lm_head` there, so a seed draws the weights the 0.1 layout drew, where the head was part of
        the language model and initialised with it)."""
        super().__init__(config)
        if config.vlm_config is None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.multi_modal_projector = GSVAMultiModalProjector(config)
            self.language_model = AutoModel.from_config(config.text_config)
            if after_language_model is not None:
                after_language_model(self.language_model)
        else:
            self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        # The token-type inputs the VLM's forward takes (read once: `image_token_types` runs on every pass).
        accepted = inspect.signature(self.vlm.model.forward).parameters if self.is_composed else {}
        self.token_type_inputs = tuple(name for name in TOKEN_TYPE_INPUTS if name in accepted)
        self.sam = AutoModel.from_config(config.sam_config)
        self.text_hidden_fcs = build_text_hidden_fcs(config.get_text_config().hidden_size, config.out_dim)
        self.post_init()

    @property
    def is_composed(self) -> bool:
        """Whether the backbone is a transformers VLM (`vlm`) rather than LLaVA v1's layout."""
        return self.config.vlm_config is not None

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings() if self.is_composed else self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        if self.is_composed:
            self.vlm.set_input_embeddings(value)
        else:
            self.language_model.set_input_embeddings(value)

    def position_ids(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, **image_inputs) -> torch.Tensor:
        """Positions of every token of `input_ids` (pads anywhere, masked by `attention_mask`), as the backbone's
        own prefill computes them: 1-D count of real tokens before each, or Qwen-style 3-D M-RoPE positions from
        the image grid. Callers feeding a chunk on a KV cache pass the whole sequence so far and keep its tail."""
        attention_mask = attention_mask.to(input_ids.device)
        if self.is_composed and hasattr(self.vlm.model, "get_rope_index"):
            positions, _ = self.vlm.model.get_rope_index(
                input_ids=input_ids,
                mm_token_type_ids=(input_ids == self.config.image_token_id).int(),
                image_grid_thw=image_inputs.get("image_grid_thw"),
                attention_mask=attention_mask,
            )
            return positions
        return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    def composed_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, **image_inputs) -> torch.Tensor:
        """Last-layer states `[B, L, d]` of one whole pass of a composed VLM over padded rows, at the positions its
        own prefill computes; the per-token image flags are recomputed from `input_ids` (generate's answer pass,
        teacher forcing)."""
        image_inputs = {k: v for k, v in image_inputs.items() if k not in TOKEN_TYPE_INPUTS and v is not None}
        return self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=self.position_ids(input_ids, attention_mask, **image_inputs),
            use_cache=False,
            **image_inputs,
            **self.image_token_types(input_ids),
        ).last_hidden_state

    def image_token_types(self, input_ids: torch.LongTensor) -> dict:
        """The per-token image flags a composed VLM needs beside `input_ids` (Qwen's `mm_token_type_ids`, Gemma 3's
        `token_type_ids`), computed from the image token, so any span of a sequence can be fed on its own."""
        if not self.token_type_inputs:
            return {}
        flags = (input_ids == self.config.image_token_id).long()
        return dict.fromkeys(self.token_type_inputs, flags)

    # ----------------------------------------------------------------- backbone
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP hidden states at `vision_feature_layer` (CLS dropped for "default"), projected to the LM width."""
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def get_sam_image_embeddings(self, sam_pixel_values: torch.Tensor):
        """The mask decoder's image encoder output; under `no_grad` unless the encoder is trained.

        SAM: the image embedding `[B, C, h, w]`. SAM-HQ: (embedding, first global-attention block's output).
        SAM 2 / EdgeTAM: (lowest-resolution FPN level, the two high-resolution levels), before the mask decoder's
        own `conv_s0`/`conv_s1` (trained with it) and SAM 2's `no_memory_embedding` (a bare parameter that stays as
        loaded: a LoRA adapter could not hold it), which `masks_from_hidden_states` applies.
        Every tensor has the batch first: rows can be selected or repeated alike (`map_embeddings`).
        """
        encoder = self.sam.vision_encoder
        pixel_values = sam_pixel_values.to(encoder.dtype)
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(trained):
            outputs = encoder(pixel_values, return_dict=True)
        kind = self.config.sam_config.model_type
        if kind == "sam":
            return outputs.last_hidden_state
        if kind == "sam_hq":
            return outputs.last_hidden_state, outputs.intermediate_embeddings[0]
        levels = list(outputs.fpn_hidden_states)
        return (levels[-1], *levels[:-1])

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image placeholder run replaced by that row's visual tokens."""
        image_mask = input_ids == self.config.image_token_id
        embeddings = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            if image_mask.any():
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            return embeddings
        features = self.get_image_features(pixel_values).to(embeddings.dtype)
        if image_mask.sum() != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {int(image_mask.sum())} image tokens but pixel_values give "
                f"{features.shape[0]} images x {features.shape[1]} features; each row needs exactly "
                f"{self.config.num_image_tokens} image tokens and one image"
            )
        return embeddings.masked_scatter(image_mask.unsqueeze(-1), features)

    # ----------------------------------------------------------------- mask decoder
    @torch.no_grad()
    def draw_mask_path(self) -> None:
        """GSVA's draw of SAM and `text_hidden_fcs` for a model trained from scratch: PyTorch's default layer init
        (segment-anything's modules) and Fourier features with std 1, instead of transformers' normal(0.02), which
        trains the mask path much more slowly. Under `init.guard_torch_init_functions` (as `initialize_weights`
        calls it) loaded tensors are left alone; called directly it redraws the whole mask path."""
        for module in list(self.sam.modules()) + list(self.text_hidden_fcs.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.LayerNorm)):
                module.reset_parameters()
        nn.init.normal_(self.sam.shared_image_embedding.positional_embedding, 0.0, 1.0)

    def masks_from_hidden_states(
        self, slot_hidden_states: torch.Tensor, sam_image_embeddings: torch.Tensor, decode: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one place where `[SEG]` hidden states become masks, for training, evaluation and inference.

        slot_hidden_states: `[B, S, d]` last-layer states at the positions just before each slot (`gather_slot_states`).
        sam_image_embeddings: `[B, C, h, w]` from `get_sam_image_embeddings`, one per row.
        decode: `[B, S]` bool, the slots that get a mask (usually `slot_is_seg`).
        Returns SAM's low-resolution mask logits `[B, S, h', w']` (float32) and IoU predictions `[B, S]`, zeros
        where `decode` is False. All decoded slots of the batch go through SAM's mask decoder in one call.
        """
        mask_decoder = self.sam.mask_decoder
        dtype = mask_decoder.iou_token.weight.dtype
        decode = decode.to(slot_hidden_states.device)
        batch, count = decode.shape
        first = sam_image_embeddings if torch.is_tensor(sam_image_embeddings) else sam_image_embeddings[0]
        # SAM's mask decoder upscales its image embedding 4x.
        side = tuple(4 * size for size in first.shape[-2:])
        masks = torch.zeros((batch, count, *side), dtype=torch.float32, device=first.device)
        iou = torch.zeros((batch, count), dtype=torch.float32, device=first.device)
        total = int(decode.sum())
        if total == 0:
            return masks, iou
        states = slot_hidden_states[decode]
        prompts = self.text_hidden_fcs[0](states.to(next(self.text_hidden_fcs.parameters()).dtype)).to(dtype)
        kind = self.config.sam_config.model_type
        if kind not in ("sam", "sam_hq"):
            # SAM 2's `get_image_features` steps that belong to the mask decoder (trained with it): its 1x1 convolutions
            # of the high-resolution levels, once per image rather than once per slot.
            embedding, level_0, level_1 = sam_image_embeddings
            sam_image_embeddings = (
                embedding, mask_decoder.conv_s0(level_0.to(dtype)), mask_decoder.conv_s1(level_1.to(dtype))
            )  # fmt: skip
        # Slot t of the call sees its own row's image embedding.
        owner = torch.nonzero(decode)[:, 0].to(first.device)
        selected = map_embeddings(lambda e: e.to(dtype).index_select(0, owner), sam_image_embeddings)
        image_embeddings = selected if torch.is_tensor(selected) else selected[0]
        positional = self.sam.get_image_wide_positional_embeddings().to(dtype).expand(total, -1, -1, -1)
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1)
        extra = {}
        if kind == "sam_hq":
            extra = {"hq_token_only": False, "intermediate_embeddings": [selected[1]]}
        elif kind != "sam":
            image_embeddings = image_embeddings + self.sam.no_memory_embedding.to(dtype).reshape(1, -1, 1, 1)
            extra = {"high_resolution_features": list(selected[1:])}
        low_res, scores = mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=prompts[:, None, None, :],
            dense_prompt_embeddings=no_mask.expand_as(image_embeddings),
            multimask_output=False,
            **extra,
        )[:2]
        decode = decode.to(masks.device)
        masks = masks.masked_scatter(decode[..., None, None], low_res[:, 0, 0].float())
        iou = iou.masked_scatter(decode, scores[:, 0, 0].float())
        return masks, iou


    # ----------------------------------------------------------------- backbone forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> GSVAModelOutputWithPast:
        r"""
        The backbone: `input_ids` with each image expanded to `config.num_image_tokens` image tokens (or
        `inputs_embeds` from `embed_inputs`) and `pixel_values` (CLIP input, one image per row with image tokens) in,
        the decoder's last hidden states out. The processor's sizes are accepted and ignored.
        """
        drop_processor_sizes(kwargs)
        common = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        if self.is_composed:
            outputs = self.vlm.model(input_ids=input_ids, inputs_embeds=inputs_embeds, pixel_values=pixel_values, **common)
        else:
            if inputs_embeds is None:
                if input_ids is None:
                    raise ValueError("forward needs input_ids or inputs_embeds")
                inputs_embeds = self.embed_inputs(input_ids, pixel_values)
            outputs = self.language_model(inputs_embeds=inputs_embeds, **common)
        return GSVAModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache if use_cache is not False else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class GSVAForCausalLM(GSVAPreTrainedModel, GenerationMixin):
    """GSVA's head (llava's `LlavaForConditionalGeneration` shape): `model` (a `GSVAModel`) plus `lm_head`, GSVA's
    losses, `generate` with masks, target mode and the `[REJ]` rule; see the module docstring."""

    # The Trainer must not pass `num_items_in_batch`: GSVA's CE is a mean over the batch's answer tokens.
    accepts_loss_kwargs = False
    _legacy_key_mapping = LEGACY_KEY_MAPPING
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: GSVAConfig):
        super().__init__(config)
        built = []
        self.model = GSVAModel(config, lambda language_model: built.append(self._new_lm_head(language_model)))
        # A composed VLM keeps its own LM head (`model.vlm`); LLaVA v1's is the head's, as in llava.
        self.lm_head = built[0] if built else None
        self.post_init()

    @property
    def is_composed(self) -> bool:
        return self.model.is_composed

    def _new_lm_head(self, language_model: nn.Module) -> nn.Linear:
        """`lm_head`, initialised at once with the language model's own init (as its causal-LM class would)."""
        text = self.config.text_config
        lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        with torch.no_grad(), init.guard_torch_init_functions():
            apply_init(lm_head, language_model._initialize_weights, self.is_custom_code())
        return lm_head

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """`lm_head` is tied to the input embeddings when the text config says so (as the 0.1 layout's causal LM
        was); GSVA's own `tie_word_embeddings` stays False."""
        tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        if not self.is_composed and getattr(self.config.get_text_config(), "tie_word_embeddings", False):
            tied.update(self._tied_weights_keys)
        return tied

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        """transformers' initialisation (each sub-model's own `_init_weights`; `lm_head` the language model's), in
        the 0.1 layout's order (vision tower, projector, language model with its head, SAM, `text_hidden_fcs`) so a
        seed draws the same weights; then SAM and `text_hidden_fcs` as GSVA draws them (`GSVAModel.draw_mask_path`).
        The guarded init functions leave loaded weights alone, so only tensors a checkpoint lacks are drawn."""
        base, custom = self.model, self.is_custom_code()
        if self.is_composed:
            parts = [(base.vlm, base.vlm._initialize_weights)]
        else:
            parts = [
                (base.vision_tower, base.vision_tower._initialize_weights),
                (base.multi_modal_projector, base._initialize_weights),
                (base.language_model, base.language_model._initialize_weights),
                (self.lm_head, base.language_model._initialize_weights),
            ]
        for part, init_fn in parts + [(base.sam, base.sam._initialize_weights), (base.text_hidden_fcs, base._initialize_weights)]:
            apply_init(part, init_fn, custom)
        base._initialize_weights(base, custom)
        self._initialize_weights(self, custom)
        base.draw_mask_path()
        if self.is_composed:
            # The VLM's own tying (Gemma 3, InternVL) after its parts are drawn.
            base.vlm.tie_weights()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write an `auto_map` for every Auto class that loads GSVA and, next to the code, the pipeline file with
        its `custom_pipelines` entry, so `pipeline(model=folder, trust_remote_code=True)` needs no task."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        pipeline_source = Path(__file__).with_name(PIPELINE_FILE)
        if pipeline_source.is_file():
            self.config.custom_pipelines = CUSTOM_PIPELINES
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if pipeline_source.is_file():
            shutil.copyfile(pipeline_source, Path(save_directory) / PIPELINE_FILE)
        return result

    # ----------------------------------------------------------------- the base's parts (as llava's head)
    @property
    def language_model(self) -> nn.Module:
        return self.model.vlm.get_decoder() if self.is_composed else self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vlm.get_encoder(modality="image") if self.is_composed else self.model.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module | None:
        return None if self.is_composed else self.model.multi_modal_projector

    @property
    def sam(self) -> nn.Module:
        return self.model.sam

    @property
    def text_hidden_fcs(self) -> nn.ModuleList:
        return self.model.text_hidden_fcs

    # ----------------------------------------------------------------- embeddings (needed by resize, peft, generate)
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.vlm.get_output_embeddings() if self.is_composed else self.lm_head

    def set_output_embeddings(self, value: nn.Module):
        if self.is_composed:
            self.model.vlm.set_output_embeddings(value)
        else:
            self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.language_model

    # ----------------------------------------------------------------- the base's interfaces, for callers of the head
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def get_sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_sam_image_embeddings(sam_pixel_values)

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        return self.model.embed_inputs(input_ids, pixel_values)

    def masks_from_hidden_states(
        self, slot_hidden_states: torch.Tensor, sam_image_embeddings: torch.Tensor, decode: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.masks_from_hidden_states(slot_hidden_states, sam_image_embeddings, decode)

    # ----------------------------------------------------------------- [SEG] slots
    def target_slots(self, input_ids: torch.LongTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row, the positions of `[SEG]`/`[REJ]` tokens in text order and whether each is `[SEG]`."""
        slots = []
        for row in input_ids:
            positions = torch.nonzero(
                (row == self.config.seg_token_id) | (row == self.config.rej_token_id), as_tuple=False
            ).flatten()
            slots.append((positions, row[positions] == self.config.seg_token_id))
        return slots

    def gather_slot_states(
        self, last_hidden_state: torch.Tensor, input_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one `[SEG]` gather: the states that predict each `[SEG]`/`[REJ]` of `input_ids` (position - 1;
        `last_hidden_state[:, j]` belongs to `input_ids[:, j]`) as `[B, S, d]`, with `slot_is_seg` and `slot_mask`
        `[B, S]` (rows padded to the most slots)."""
        states, flags = [], []
        for row, (positions, is_seg) in enumerate(self.target_slots(input_ids)):
            if (positions == 0).any():
                raise ValueError(f"row {row}: a [SEG]/[REJ] token at position 0 has no preceding state")
            states.append(last_hidden_state[row, positions - 1])
            flags.append(is_seg)
        slot_states, slot_mask = pad_slots(states)
        return slot_states, pad_slots(flags, fill=False)[0], slot_mask

    # ----------------------------------------------------------------- losses
    def ce_loss(self, logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """Shifted next-token CE, mean over answer tokens; `[SEG]`/`[REJ]` targets weighted by `seg_rej_ce_weight`."""
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
        per_token = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = shift_labels != IGNORE_INDEX
        weight = valid.float()
        if self.config.seg_rej_ce_weight != 1.0:
            is_target = (shift_labels == self.config.seg_token_id) | (shift_labels == self.config.rej_token_id)
            weight = torch.where(is_target & valid, weight * self.config.seg_rej_ce_weight, weight)
        return (per_token * weight).sum() / weight.sum().clamp_min(1e-8)

    def mask_losses(
        self, pred_masks: torch.Tensor, slot_is_seg: torch.Tensor, slot_mask: torch.Tensor, gt_masks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GSVA's weighted BCE and Dice over all slots of the batch at the ground truth's size, normalised by the
        slot count incl. `[REJ]` (whose prediction is all zeros). A mask's size gives SAM's resized input size
        (`sam_reshaped_size`), so the low-resolution logits are brought to it exactly as the processor would."""
        counts = slot_mask.sum(1).tolist()
        for row, gt in enumerate(gt_masks):
            if gt.dim() != 3 or gt.shape[0] != counts[row]:
                raise ValueError(
                    f"row {row}: the answer has {counts[row]} [SEG]/[REJ] slots but gt_masks[{row}] has shape "
                    f"{tuple(gt.shape)}; give one mask per slot at the original image size, [num_slots, H, W]"
                )
        side, square = self.config.mask_input_size, self.config.square_mask_input
        sizes = [tuple(gt.shape[1:]) for gt in gt_masks]
        seg_masks = upscale_slot_masks(
            pred_masks, slot_is_seg, sizes, [mask_input_size(size, side, square) for size in sizes], side, square
        )
        bce = dice = pred_masks.new_zeros(())
        for row, (seg, gt) in enumerate(zip(seg_masks, gt_masks)):
            pred = seg.new_zeros((counts[row], *sizes[row]))
            pred[slot_is_seg[row, : counts[row]].to(seg.device)] = seg
            gt = gt.to(pred.device)
            bce = bce + mask_bce_loss(pred, gt)
            dice = dice + mask_dice_loss(pred, gt)
        denominator = sum(counts) + 1e-8
        return self.config.bce_loss_weight * bce / denominator, self.config.dice_loss_weight * dice / denominator

    # ----------------------------------------------------------------- forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        sam_image_embeddings: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> GSVAOutput:
        r"""
        input_ids: text with each image expanded to `config.num_image_tokens` image tokens (see `GSVAProcessor`).
        pixel_values: CLIP input, one image per row that holds image tokens.
        sam_pixel_values / sam_image_embeddings: SAM input `[B, 3, 1024, 1024]` or its encoder output. When given,
            low-resolution masks are predicted for every `[SEG]` in `input_ids`.
        gt_masks: per row, `[num_slots, H, W]` ground truth at the original size, one per `[SEG]`/`[REJ]` slot;
            with `labels` it adds the BCE and Dice losses.
        The processor's `original_sizes` / `reshaped_input_sizes` are accepted and ignored (see `drop_processor_sizes`).
        """
        drop_processor_sizes(kwargs)
        wants_masks = sam_pixel_values is not None or sam_image_embeddings is not None
        decoder_outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )
        last_hidden_state = decoder_outputs.last_hidden_state
        if logits_to_keep and labels is None:
            logits = self.get_output_embeddings()(last_hidden_state[:, -logits_to_keep:])
        else:
            logits = self.get_output_embeddings()(last_hidden_state)

        pred_masks = iou_scores = slot_is_seg = slot_mask = None
        if wants_masks:
            if input_ids is None:
                raise ValueError("mask prediction needs input_ids to find the [SEG] tokens")
            if sam_image_embeddings is None:
                sam_image_embeddings = self.get_sam_image_embeddings(sam_pixel_values)
            slot_states, slot_is_seg, slot_mask = self.gather_slot_states(last_hidden_state, input_ids)
            pred_masks, iou_scores = self.masks_from_hidden_states(slot_states, sam_image_embeddings, slot_is_seg)

        loss = ce = bce = dice = None
        if labels is not None:
            ce = self.config.ce_loss_weight * self.ce_loss(logits, labels)
            loss = ce
            if gt_masks is not None:
                if pred_masks is None:
                    raise ValueError("gt_masks need sam_pixel_values (or sam_image_embeddings) to predict masks")
                bce, dice = self.mask_losses(pred_masks, slot_is_seg, slot_mask, gt_masks)
                loss = ce + bce + dice

        return GSVAOutput(
            loss=loss,
            ce_loss=ce,
            mask_bce_loss=bce,
            mask_dice_loss=dice,
            logits=logits,
            cache=decoder_outputs.cache,
            hidden_states=decoder_outputs.hidden_states,
            attentions=decoder_outputs.attentions,
            pred_masks=pred_masks,
            iou_scores=iou_scores,
            slot_is_seg=slot_is_seg,
            slot_mask=slot_mask,
        )

    # ----------------------------------------------------------------- [REJ] rule
    def slot_decisions(self, slot_logits: torch.Tensor, slot_is_seg: torch.Tensor | None = None) -> torch.Tensor:
        """The one place that turns the logits one position before each slot into `[REJ]` decisions (`[n]` bool,
        True: rejected).

        slot_logits: `[n, vocab]`. With `slot_is_seg`, the ground-truth slot tokens (GSVA's teacher-forced
        protocol), the full-vocabulary argmax decides: a ground-truth `[SEG]` slot is kept only if `[SEG]` is the
        argmax, a `[REJ]` slot rejected only if `[REJ]` is. Without it (the model decides) the larger of the two
        logits wins, ties keeping `[SEG]`.
        """
        seg_id, rej_id = self.config.seg_token_id, self.config.rej_token_id
        if slot_is_seg is None:
            return slot_logits[:, rej_id] > slot_logits[:, seg_id]
        predicted = slot_logits.argmax(-1)
        slot_is_seg = slot_is_seg.to(predicted.device)
        return torch.where(slot_is_seg, predicted != seg_id, predicted == rej_id)

    def slot_scores(self, slot_logits: torch.Tensor, is_seg: torch.Tensor) -> torch.Tensor:
        """Probability of the chosen slot token between `[SEG]` and `[REJ]` (softmax over the two logits)."""
        pair = slot_logits[..., [self.config.seg_token_id, self.config.rej_token_id]].float().softmax(-1)
        return torch.where(is_seg.to(pair.device), pair[..., 0], pair[..., 1])

    # ----------------------------------------------------------------- shared system prompt
    def shared_prompt_length(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> int:
        """How many leading positions hold the same real, non-image token in every row (GSVA's system prompt);
        0 when fewer than two do, as a one-token prompt is not worth a pass of its own."""
        if self.is_composed:
            # A composed VLM's prefix runs through its own forward (family positions and image handling).
            return 0
        common = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
        common &= input_ids[0] != self.config.image_token_id
        shared = int(common.int().cumprod(0).sum())
        return shared if shared >= 2 else 0

    def run_shared_prompt(self, prompt_embeds: torch.Tensor, batch: int) -> tuple[torch.Tensor, object]:
        """The shared prompt `[1, n, d]` run once: its last-layer states and its KV cache repeated over `batch` rows,
        so every row continues from it at position n with a full pass's numbers (target mode, evaluation)."""
        head = self.get_decoder()(inputs_embeds=prompt_embeds, use_cache=True, return_dict=True)
        head.cache.batch_repeat_interleave(batch)
        return head.last_hidden_state, head.cache

    # ----------------------------------------------------------------- generation and target mode
    def _special_suppressed(self, kwargs: dict) -> dict:
        """Image and image-boundary tokens are never generated: they join whatever `suppress_tokens` the call or its
        generation config already holds (set on a copy of a given config, so transformers sees no conflict)."""
        special = [self.config.image_token_id, self.config.im_start_token_id, self.config.im_end_token_id]
        special = [token for token in special if token is not None]
        config = kwargs.get("generation_config")
        if config is not None:
            config = copy.deepcopy(config)
            config.suppress_tokens = sorted(set(config.suppress_tokens or []) | set(special))
            kwargs["generation_config"] = config
        else:
            own = kwargs.get("suppress_tokens") or self.generation_config.suppress_tokens or []
            kwargs["suppress_tokens"] = sorted(set(own) | set(special))
        return kwargs

    def _slot_outputs(
        self,
        slot_states: torch.Tensor,
        slot_is_seg: torch.Tensor,
        slot_mask: torch.Tensor,
        slot_logits: list[torch.Tensor],
        sam_image_embeddings: torch.Tensor,
    ) -> dict:
        """Scores and low-resolution masks for decided slots (generated or target mode), one SAM image embedding
        per row; `slot_logits` per row `[n_i, vocab]`, the logits the decisions were read from."""
        masks, iou = self.masks_from_hidden_states(slot_states, sam_image_embeddings, slot_is_seg)
        scores = [self.slot_scores(logits, is_seg[: len(logits)]) for logits, is_seg in zip(slot_logits, slot_is_seg)]
        return {
            "slot_is_seg": slot_is_seg,
            "slot_mask": slot_mask,
            "slot_scores": pad_slots(scores, fill=0.0)[0],
            "pred_masks": masks,
            "iou_scores": iou,
        }

    def _slot_ids(self, device) -> torch.Tensor:
        return torch.tensor([self.config.seg_token_id, self.config.rej_token_id], device=device)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        sam_image_embeddings: torch.Tensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, plus low-resolution masks for the generated `[SEG]`s.

        Takes `**processor(images=..., text=...)` as is (its sizes are ignored). The SAM inputs never reach the
        decoding steps. With `return_dict_in_generate=True` (and the SAM inputs) the result is a
        `GSVAGenerateOutput`: the usual fields plus per row the answer ids, slot flags, scores and mask logits
        (`processor.post_process_instance_segmentation` reads it); SAM's encoder runs once per image after
        decoding, and the `[SEG]` states come from one pass over the answer on top of the decoding cache. Without
        it, `generate` returns token ids like any causal LM.
        """
        drop_processor_sizes(kwargs)
        kwargs = self._special_suppressed(kwargs)
        input_ids = kwargs.pop("input_ids", inputs)
        config = kwargs.get("generation_config") or self.generation_config
        wants_masks = bool(kwargs.get("return_dict_in_generate", config.return_dict_in_generate)) and (
            sam_pixel_values is not None or sam_image_embeddings is not None
        )
        if not wants_masks:
            if self.is_composed:
                return self._vlm_generate(input_ids, kwargs)
            return super().generate(input_ids, **kwargs)
        if (kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1) != 1:
            raise ValueError("masks from generate need num_beams=1 (greedy or sampling)")
        copies = int(kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_length = input_ids.shape[1]
        attention_mask = attention_mask.repeat_interleave(copies, dim=0)
        if self.is_composed:
            if copies != 1:
                raise ValueError(
                    "masks from generate on a composed VLM need num_return_sequences=1; call generate once per "
                    "sample instead"
                )
            out = self._vlm_generate(input_ids, {**kwargs, "use_cache": True})
            sequences = out.sequences
            # One pass over prompt and answer through the VLM's own forward (its positions and image handling).
            full_mask = torch.cat([attention_mask, attention_mask.new_ones(sequences[:, prompt_length:].shape)], 1)
            image_inputs = {name: kwargs[name] for name in IMAGE_INPUTS if name in kwargs}
            states = self.model.composed_states(sequences, full_mask, **image_inputs)[:, prompt_length - 1 :]
        else:
            out = super().generate(input_ids, **{**kwargs, "use_cache": True})
            sequences = out.sequences
            # One pass over the answer on top of the cache of the prompt gives the last-layer state at every answer
            # position, exactly as decoding saw it.
            cache = out.cache
            cache.crop(-(cache.get_seq_length() - (prompt_length - 1)))
            feed = sequences[:, prompt_length - 1 : -1]
            full_mask = torch.cat([attention_mask, attention_mask.new_ones((sequences.shape[0], feed.shape[1] - 1))], dim=1)
            positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)[:, prompt_length - 1 :]
            states = self.get_decoder()(
                inputs_embeds=self.embed_inputs(feed, None),
                attention_mask=full_mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        out.cache = None

        # `states[:, j]` belongs to `sequences[:, prompt_length - 1 + j]`; tokens after a row's end are padding.
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos_ids = torch.tensor([e for e in (eos if isinstance(eos, list) else [eos]) if e is not None], device=sequences.device)
        answers = sequences[:, prompt_length:].clone()
        answer_ids, finished = [], []
        for row, answer in enumerate(answers):
            ends = torch.nonzero(torch.isin(answer, eos_ids)).flatten()
            finished.append(bool(ends.numel()))
            if ends.numel():
                answer[int(ends[0]) :] = eos_ids[0]
                answer_ids.append(sequences[row, prompt_length : prompt_length + int(ends[0])])
            else:
                answer_ids.append(sequences[row, prompt_length:])
        aligned = torch.cat([sequences[:, prompt_length - 1 : prompt_length], answers], dim=1)
        slot_states, slot_is_seg, slot_mask = self.gather_slot_states(states, aligned)
        counts = slot_mask.sum(1).tolist()
        slot_logits = [self.get_output_embeddings()(slot_states[row, :n]) for row, n in enumerate(counts)]

        if sam_image_embeddings is None:
            sam_image_embeddings = self.get_sam_image_embeddings(sam_pixel_values)
        embeddings = map_embeddings(lambda e: e.repeat_interleave(copies, dim=0), sam_image_embeddings)
        slots = self._slot_outputs(slot_states, slot_is_seg, slot_mask, slot_logits, embeddings)
        return GSVAGenerateOutput(**dict(out.items()), **slots, answer_ids=answer_ids, finished=finished)

    def _vlm_generate(self, input_ids: torch.LongTensor, kwargs: dict):
        """The composed VLM's own `generate` (its input preparation and positions) with GSVA's generation config."""
        if kwargs.get("generation_config") is None:
            self.model.vlm.generation_config = self.generation_config
        return self.model.vlm.generate(input_ids, **kwargs)

    def _has_sliding_window(self) -> bool:
        """Whether a composed VLM has sliding-window attention layers (Gemma 3), which count padding inside a
        sequence as tokens of the window."""
        text = self.config.get_text_config()
        return self.is_composed and "sliding_attention" in (getattr(text, "layer_types", None) or ())

    def _decide_rows_apart(self, input_ids, attention_mask, image_inputs: dict, sam_pixel_values, sam_image_embeddings):
        """`decide_targets` one row at a time, merged as one batch's output (for sliding-window VLMs, where target
        mode's padding inside chunks would shift a padded row's window)."""
        rows = []
        for row in range(input_ids.shape[0]):
            keep = attention_mask[row].bool()
            single = split_image_inputs(image_inputs, row)
            sam = {"sam_pixel_values": sam_pixel_values[row : row + 1]} if sam_image_embeddings is None else {
                "sam_image_embeddings": map_embeddings(lambda e: e[row : row + 1], sam_image_embeddings)
            }
            rows.append(self.decide_targets(input_ids[row : row + 1, keep], attention_mask[row : row + 1, keep], **single, **sam))
        merged = {"sequences": [seq for out in rows for seq in out.sequences]}
        for name, fill in (("slot_is_seg", False), ("slot_mask", False), ("slot_scores", 0.0), ("pred_masks", 0.0), ("iou_scores", 0.0)):
            merged[name] = pad_slots([out[name][0, : int(out.slot_mask.sum())] for out in rows], fill=fill)[0]
        return GSVATargetsOutput(**merged)

    @torch.no_grad()
    def decide_targets(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        sam_pixel_values: torch.Tensor | None = None,
        sam_image_embeddings: torch.Tensor | None = None,
        **processor_sizes,
    ) -> GSVATargetsOutput:
        """Target mode: the answer is fixed up to its slots; the model decides only `[SEG]` or `[REJ]` at each.

        Takes `**processor(images=..., targets=[...])` (its sizes are ignored): each row holds GSVA's answer
        template with one slot per asked phrase. The system prompt runs once for the batch; one pass reads the
        image, the question and the answer up to the first slot; then, per slot, the decided slot token and the
        text up to the next slot are fed on the same KV cache. The decision is `slot_decisions` (larger of the two
        logits, conditioned on the earlier decisions) and the `[SEG]` state is the last state of that pass. Every
        asked phrase gets exactly one decision, in order.
        """
        drop_processor_sizes(processor_sizes)
        image_inputs = {"pixel_values": pixel_values}
        if self.is_composed:
            image_inputs.update({name: processor_sizes.pop(name) for name in IMAGE_INPUTS[1:] if name in processor_sizes})
            for name in TOKEN_TYPE_INPUTS:
                processor_sizes.pop(name, None)
        if processor_sizes:
            raise TypeError(f"decide_targets got unexpected arguments: {sorted(processor_sizes)}")
        if input_ids.shape[0] > 1 and self._has_sliding_window():
            return self._decide_rows_apart(input_ids, attention_mask, image_inputs, sam_pixel_values, sam_image_embeddings)
        if sam_pixel_values is None and sam_image_embeddings is None:
            raise ValueError("decide_targets needs sam_pixel_values (or sam_image_embeddings) from GSVAProcessor")
        slot_ids = self._slot_ids(input_ids.device)
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
        slots = [torch.nonzero(torch.isin(ids, slot_ids)).flatten() for ids in rows]
        for row, positions in enumerate(slots):
            if positions.numel() == 0:
                raise ValueError(f"row {row} has no [SEG]/[REJ] slot; build target-mode inputs with processor(targets=...)")
            if int(positions[0]) == 0:
                raise ValueError(f"row {row}: a slot at position 0 has no preceding state")
        count = max(len(positions) for positions in slots)
        decided = [ids.clone() for ids in rows]
        # The system prompt, common to every row up to the image, runs once; its cache is repeated over the batch.
        # Every row keeps at least the token before its first slot for the first chunk.
        before_first_slot = min(int(positions[0]) for positions in slots) - 1
        head = torch.stack([ids[:before_first_slot] for ids in rows])
        shared = self.shared_prompt_length(head, torch.ones_like(head))
        cache = None
        if shared:
            _, cache = self.run_shared_prompt(self.embed_inputs(rows[0][None, :shared], None), len(rows))
        # Chunk k of a row: the text before its first slot (k = 0), else its slot k-1 token and the text up to slot k.
        bounds = [[shared, *positions.tolist()] for positions in slots]
        seen = torch.full((len(rows),), shared, dtype=torch.long, device=input_ids.device)
        full_mask = input_ids.new_ones((len(rows), shared))
        full_ids = input_ids.new_zeros((len(rows), shared))
        slot_states = [[] for _ in rows]
        slot_logits = [[] for _ in rows]
        for step in range(count):
            chunks = [
                decided[row][bounds[row][step] : bounds[row][step + 1]] if step < len(slots[row]) else decided[row][:0]
                for row in range(len(rows))
            ]
            width = max(len(chunk) for chunk in chunks)
            ids = input_ids.new_zeros((len(rows), width))
            mask = input_ids.new_zeros((len(rows), width))
            for row, chunk in enumerate(chunks):
                # Left-aligned padding inside the chunk: every row's deciding state is the last position.
                ids[row, width - len(chunk) :] = chunk
                mask[row, width - len(chunk) :] = 1
            full_mask = torch.cat([full_mask, mask], dim=1)
            if self.is_composed:
                # Through the VLM's own forward: the image with the first chunk, positions of the whole sequence so
                # far (M-RoPE included) cut to the chunk.
                full_ids = torch.cat([full_ids, ids], dim=1)
                first = {**image_inputs, **self.model.image_token_types(ids)} if step == 0 else {}
                output = self.model(
                    input_ids=ids,
                    attention_mask=full_mask,
                    position_ids=self.model.position_ids(full_ids, full_mask, **image_inputs)[..., -width:],
                    cache=cache,
                    use_cache=True,
                    **first,
                )
            else:
                output = self.get_decoder()(
                    inputs_embeds=self.embed_inputs(ids, pixel_values if step == 0 else None),
                    attention_mask=full_mask,
                    position_ids=(seen[:, None] + mask.cumsum(-1) - 1).clamp_min(0),
                    cache=cache,
                    use_cache=True,
                )
            cache, seen = output.cache, seen + mask.sum(-1)
            last = output.last_hidden_state[:, -1]
            logits = self.get_output_embeddings()(last)
            rejected = self.slot_decisions(logits)
            for row in range(len(rows)):
                if step < len(slots[row]):
                    position = int(slots[row][step])
                    decided[row][position] = self.config.rej_token_id if rejected[row] else self.config.seg_token_id
                    slot_states[row].append(last[row])
                    slot_logits[row].append(logits[row])
        if sam_image_embeddings is None:
            sam_image_embeddings = self.get_sam_image_embeddings(sam_pixel_values)
        states, slot_mask = pad_slots([torch.stack(states) for states in slot_states])
        slot_is_seg, _ = pad_slots([ids[positions] == self.config.seg_token_id for ids, positions in zip(decided, slots)], fill=False)
        logits = [torch.stack(row_logits) for row_logits in slot_logits]
        outputs = self._slot_outputs(states, slot_is_seg, slot_mask, logits, sam_image_embeddings)
        return GSVATargetsOutput(sequences=decided, **outputs)

    def segment(self, processor, images, **kwargs) -> list:
        """`pipeline_gsva.segment(self, processor, images, ...)`: image(s) + a question (`text=`) or target phrases
        (`targets=`) in, per image one `SegmentationResult` out (kept on the model for existing callers)."""
        try:
            from .pipeline_gsva import segment
        except ImportError:
            from pipeline_gsva import segment
        return segment(self, processor, images, **kwargs)


def split_image_inputs(image_inputs: dict, row: int) -> dict:
    """Row `row`'s part of a composed VLM's image inputs: its `pixel_values` (Qwen's flattened patches by its grid,
    else the row) and the row of every other input."""
    single = {}
    grid = image_inputs.get("image_grid_thw")
    for name, value in image_inputs.items():
        if value is None:
            continue
        if name == "pixel_values" and grid is not None:
            counts = grid.prod(-1).tolist()
            start = sum(counts[:row])
            single[name] = value[start : start + counts[row]]
        else:
            single[name] = value[row : row + 1]
    return single


def drop_processor_sizes(kwargs: dict) -> None:
    """Remove the processor's `original_sizes` / `reshaped_input_sizes` from `kwargs`: they are for its
    post-processing and the model never reads them (as SAM's), so `model(**processor(...))` works as is."""
    for name in PROCESSOR_ONLY_INPUTS:
        kwargs.pop(name, None)


GSVAForConditionalGeneration = GSVAForCausalLM

GSVAModel.register_for_auto_class("AutoModel")
GSVAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "GSVAForCausalLM",
    "GSVAForConditionalGeneration",
    "GSVAModel",
    "GSVAPreTrainedModel",
    "GSVAModelOutputWithPast",
    "GSVAOutput",
    "GSVAGenerateOutput",
    "GSVATargetsOutput",
    "LEGACY_KEY_MAPPING",
    "current_key",
]

