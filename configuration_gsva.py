"""Configuration of GSVA: a vision-language backbone with a SAM-family mask head.

The backbone is LLaVA v1's layout (CLIP vision tower + projector + causal LM, as GSVA released it: `vision_config`,
`text_config`) or any transformers `AutoModelForImageTextToText` model (`vlm_config`); the mask decoder is SAM,
SAM-HQ, SAM 2 or EdgeTAM (`sam_config`).

Shipped with a Hub repository for ``trust_remote_code``: imports only torch and transformers.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

SUB_CONFIGS = ("vision_config", "text_config", "sam_config")
# A composed GSVA (any VLM) holds these instead.
VLM_SUB_CONFIGS = ("vlm_config", "sam_config")
# SAM-family mask decoders GSVA drives with one sparse prompt per [SEG]; SAM 2-style ones take high-resolution
# features and resize images to a square.
MASK_DECODER_TYPES = ("sam", "sam_hq", "sam2", "edgetam")
SQUARE_MASK_DECODER_TYPES = ("sam2", "edgetam")
# Upper bounds on the sizes that decide how much memory building a model takes: several times the largest real
# backbone (Llama-3-405B: hidden 16384, intermediate 53248, 126 layers; vocabularies up to 256k; SAM ViT-H), so a
# mistyped or hostile config.json is refused before anything is allocated. Checked in every sub-config, nested ones too.
SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "head_dim": 8192,
    "vocab_size": 2_097_152,
    "max_position_embeddings": 16_777_216,
    "image_size": 8192,
    "patch_size": 1024,
    "num_channels": 64,
    "projection_dim": 65536,
    "mlp_dim": 262144,
    "output_channels": 65536,
    "iou_head_depth": 64,
    "iou_head_hidden_dim": 65536,
    "num_multimask_outputs": 64,
    "image_embedding_size": 1024,
    "mask_input_channels": 4096,
    "num_point_embeddings": 64,
    "num_pos_feats": 65536,
    "window_size": 8192,
}
# Sizes that may be 0 (no windowed attention); every other bounded size is at least 1.
_MAY_BE_ZERO = {"window_size"}


def present_sub_configs(config) -> tuple[str, ...]:
    """The sub-config names a GSVA config (object or dict) holds: LLaVA v1's three, or a composed VLM's two."""
    vlm = config.get("vlm_config") if isinstance(config, dict) else getattr(config, "vlm_config", None)
    return VLM_SUB_CONFIGS if vlm is not None else SUB_CONFIGS


def check_config_dict(config_dict, where: str = "GSVA config") -> None:
    """Refuse a raw GSVA config (as read from config.json) that is not an object or lacks a sub-config: a missing or
    null `text_config` would silently build the 7B Llama default, `vision_config` CLIP ViT-L, `sam_config` SAM
    ViT-B. `where` names the file in the message."""
    if not isinstance(config_dict, dict):
        raise ValueError(f"{where}: expected a JSON object with the GSVA config, got {type(config_dict).__name__}")
    expected = present_sub_configs(config_dict)
    for key in expected:
        value = config_dict.get(key)
        if not isinstance(value, (dict, PreTrainedConfig)):
            state = "is missing" if key not in config_dict else f"is {value!r:.40}"
            raise ValueError(
                f"{where}: field {key!r} {state}; a GSVA config.json holds {', '.join(expected)} as objects "
                "(defaults are never filled in, they would build a different model)"
            )
    if expected == VLM_SUB_CONFIGS:
        extra = [key for key in ("vision_config", "text_config") if config_dict.get(key) is not None]
        if extra:
            raise ValueError(
                f"{where}: holds vlm_config and also {', '.join(extra)}; a composed GSVA's vision tower and language "
                "model are the VLM's own (vlm_config), LLaVA v1's layout uses vision_config and text_config instead"
            )


def check_config_sizes(config, where: str = "GSVA config") -> None:
    """Refuse sub-config sizes that are not ints within `SIZE_LIMITS` (nested configs such as SAM's included)."""
    pending = [(name, getattr(config, name)) for name in present_sub_configs(config)]
    while pending:
        path, sub = pending.pop()
        for key, value in vars(sub).items():
            if isinstance(value, PreTrainedConfig):
                pending.append((f"{path}.{key}", value))
            elif key in SIZE_LIMITS and value is not None:
                low = 0 if key in _MAY_BE_ZERO else 1
                # Some backbones give a size per axis (SAM 2's Hiera: image_size [1024, 1024]).
                items = value if isinstance(value, (list, tuple)) and value else [value]
                if any(isinstance(v, bool) or not isinstance(v, int) or not low <= v <= SIZE_LIMITS[key] for v in items):
                    raise ValueError(
                        f"{where}: field {path}.{key} is {value!r:.40}; expected an int from {low} to {SIZE_LIMITS[key]}"
                    )


# Upper bound on the estimated parameters of each sub-model (CLIP, the LLM, SAM). Every field can lie within
# `SIZE_LIMITS` while their product asks for trillions (hidden 65536 x 1024 layers); training (DeepSpeed ZeRO-2
# included) and `load_gsva` keep every parameter on one device, and 200 billion in bf16 is 400 GB, more than any.
MAX_SUB_MODEL_PARAMETERS = 200_000_000_000
# Fields that multiply a sub-model's feed-forward blocks (mixture-of-experts LLMs).
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _size(config, name: str) -> int:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def estimated_parameters(config) -> int:
    """About how many parameters a (sub-)config builds, from its sizes alone (nested configs, SAM's parts, summed):
    per layer the attention projections and a gated feed-forward block (per expert), the token embeddings and
    output head, the patch embedding and positions. Close to the true count (biases and norms left out): for bounds."""
    total = sum(estimated_parameters(value) for value in vars(config).values() if isinstance(value, PreTrainedConfig))
    hidden = _size(config, "hidden_size")
    inner = _size(config, "intermediate_size") or _size(config, "mlp_dim")
    heads = _size(config, "num_attention_heads") or 1
    head_dim = _size(config, "head_dim") or hidden // heads
    kv_heads = _size(config, "num_key_value_heads") or heads
    experts = max([_size(config, name) for name in _EXPERT_FIELDS] + [1])
    if experts > 1:
        inner = (_size(config, "moe_intermediate_size") or inner) * experts
    feed_forward = 3 * hidden * inner
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    patch = _size(config, "patch_size")
    patches = (_size(config, "image_size") // patch) ** 2 + _size(config, "num_channels") * patch**2 if patch else 0
    layers = _size(config, "num_hidden_layers") * (attention + feed_forward)
    return total + layers + (2 * _size(config, "vocab_size") + patches) * hidden


def check_config_parameters(config, where: str = "GSVA config") -> None:
    """Refuse a config whose vision tower, LLM or SAM would have more than `MAX_SUB_MODEL_PARAMETERS` (estimated
    before anything is built)."""
    for name in present_sub_configs(config):
        estimate = estimated_parameters(getattr(config, name))
        if estimate > MAX_SUB_MODEL_PARAMETERS:
            raise ValueError(
                f"{where}: {name} would build about {estimate / 1e9:,.0f} billion parameters (estimated from its sizes); "
                f"at most {MAX_SUB_MODEL_PARAMETERS / 1e9:,.0f} billion per sub-model are allowed"
            )


@strict
class GSVAConfig(PreTrainedConfig):
    r"""
    Composite configuration. The backbone is either LLaVA v1's layout, ``vision_config`` (CLIP vision) and
    ``text_config`` (any causal LM the Auto classes know; Llama by default), or ``vlm_config``: the config of any
    ``AutoModelForImageTextToText`` model (Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, Idefics3/SmolVLM, Gemma 3, ...), whose
    vision tower, projector, language model and LM head GSVA uses as they are. ``sam_config`` is the mask decoder's:
    ``SamConfig``, ``SamHQConfig``, ``Sam2Config`` or ``EdgeTamConfig``.

    projector_type (`str`, defaults to `"linear"`):
        `"linear"` (one `Linear`, LLaVA v1 as GSVA uses) or `"mlp2x_gelu"` (`Linear-GELU-Linear`, LLaVA-1.5).
    vision_feature_layer (`int`, defaults to -2):
        CLIP hidden-state index whose patch features feed the projector.
    vision_feature_select_strategy (`str`, defaults to `"default"`):
        `"default"` drops the CLS token (LLaVA's "patch"), `"full"` keeps it.
    image_token_id, seg_token_id, rej_token_id, im_start_token_id, im_end_token_id (`int`):
        Vocabulary ids of the image placeholder, `[SEG]`, `[REJ]`, `<im_start>` and `<im_end>`. They must match
        the processor's tokenizer; `GSVAProcessor` checks this when it is given a config. With `vlm_config` the
        image token is the VLM's and `<im_start>`/`<im_end>` are None (the VLM's chat template marks the image).
    out_dim (`int`, defaults to 256):
        Output width of `text_hidden_fcs`, the SAM prompt embedding width.
    ce_loss_weight, bce_loss_weight, dice_loss_weight (`float`): loss weights (1.0, 2.0, 0.5 in GSVA).
    seg_rej_ce_weight (`float`, defaults to 1.0):
        Extra weight of `[SEG]`/`[REJ]` answer tokens in the CE loss. 1.0 is the original loss; larger values
        are an option that teaches rejection faster on small data.
    """

    model_type = "gsva"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
                "projection_dim": 768,
            },
            optional=True,
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True),
        "sam_config": SubConfigSpec(config_class=AutoConfig, model_type="sam"),
        "vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="llava", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    vlm_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["linear", "mlp2x_gelu"] = "linear"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token_id: int = 32000
    seg_token_id: int = 32003
    rej_token_id: int = 32004
    im_start_token_id: int | None = 32001
    im_end_token_id: int | None = 32002
    out_dim: int = 256
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    seg_rej_ce_weight: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.vlm_config is not None:
            given = [name for name in ("vision_config", "text_config") if self.__dict__.get(name) is not None]
            if given:
                raise ValueError(
                    f"GSVAConfig: give vlm_config (any vision-language model) or vision_config and text_config "
                    f"(LLaVA v1's layout), not both; got vlm_config and {', '.join(given)}"
                )
        else:
            # LLaVA v1's layout: an unset vision or text config is its default (CLIP ViT-L/14, Llama).
            for name in ("vision_config", "text_config"):
                if getattr(self, name) is None:
                    setattr(self, name, self.sub_configs_defaults[name].create_subconfig(name)[0])
        super().__post_init__(**kwargs)
        check_config_sizes(self)
        check_config_parameters(self)
        if self.sam_config.model_type not in MASK_DECODER_TYPES:
            raise ValueError(
                f"GSVAConfig.sam_config has model_type {self.sam_config.model_type!r}, which is not a SAM-family mask "
                f"decoder; GSVA prompts one of {', '.join(MASK_DECODER_TYPES)} with its [SEG] states"
            )
        if self.square_mask_input and getattr(self.sam_config.mask_decoder_config, "dynamic_multimask_via_stability", False):
            raise ValueError(
                "GSVAConfig.sam_config.mask_decoder_config.dynamic_multimask_via_stability must be false: in eval mode "
                "it swaps a [SEG]'s single mask for one of SAM 2's multimask outputs, which GSVA never trains"
            )
        if self.vlm_config is not None and self.im_start_token_id is not None:
            raise ValueError("GSVAConfig with vlm_config: im_start_token_id and im_end_token_id must be None")
        if self.out_dim != self.sam_config.prompt_encoder_config.hidden_size:
            raise ValueError(
                f"GSVAConfig.out_dim ({self.out_dim}) must equal sam_config.prompt_encoder_config.hidden_size "
                f"({self.sam_config.prompt_encoder_config.hidden_size}): each [SEG] becomes one SAM prompt token."
            )
        ids = {
            "image_token_id": self.image_token_id,
            "seg_token_id": self.seg_token_id,
            "rej_token_id": self.rej_token_id,
            "im_start_token_id": self.im_start_token_id,
            "im_end_token_id": self.im_end_token_id,
        }
        ids = {name: value for name, value in ids.items() if value is not None}
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"GSVAConfig special token ids must be distinct, got {ids}")
        if self.vlm_config is not None and self.image_token_id != self.vlm_config.image_token_id:
            raise ValueError(
                f"GSVAConfig.image_token_id ({self.image_token_id}) must be the VLM's image token id "
                f"(vlm_config.image_token_id = {self.vlm_config.image_token_id})"
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reader, then `check_config_dict` naming the file, before any sub-config is built."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_config_dict(config_dict, f"config.json of {pretrained_model_name_or_path}")
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Refuse a dict without its sub-configs (AutoConfig reaches here directly); field type errors become a
        ValueError naming the field."""
        where = f"GSVA config {config_dict.get('_name_or_path') or ''}".rstrip() if isinstance(config_dict, dict) else "GSVA config"
        check_config_dict(config_dict, where)
        try:
            return super().from_dict(config_dict, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(f"{where}: {error}") from error

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        """The language model's config: `text_config`, or the VLM's own text config."""
        if self.vlm_config is not None:
            return self.vlm_config.get_text_config(*args, **kwargs)
        return super().get_text_config(*args, **kwargs)

    @property
    def backbone_type(self) -> str:
        """`"llava_v1"` (GSVA's released layout) or the VLM's model type (e.g. `"qwen2_5_vl"`)."""
        return "llava_v1" if self.vlm_config is None else self.vlm_config.model_type

    @property
    def square_mask_input(self) -> bool:
        """Whether the mask decoder's image input is a square resize (SAM 2, EdgeTAM) rather than SAM's longest side
        plus padding; masks come back to the image size accordingly."""
        return self.sam_config.model_type in SQUARE_MASK_DECODER_TYPES

    @property
    def mask_input_size(self) -> int:
        """Side of the mask decoder's square input (1024 for every released SAM-family model)."""
        return self.sam_config.prompt_encoder_config.image_size

    @property
    def num_image_tokens(self) -> int | None:
        """Number of visual tokens one image becomes (256 for CLIP ViT-L/14 at 224 px without CLS); None for a
        composed VLM, whose processor decides it per image."""
        if self.vlm_config is not None:
            return None
        per_side = self.vision_config.image_size // self.vision_config.patch_size
        return per_side * per_side + (1 if self.vision_feature_select_strategy == "full" else 0)


__all__ = [
    "GSVAConfig",
    "MASK_DECODER_TYPES",
    "MAX_SUB_MODEL_PARAMETERS",
    "SIZE_LIMITS",
    "check_config_dict",
    "check_config_parameters",
    "check_config_sizes",
    "estimated_parameters",
]

GSVAConfig.register_for_auto_class("AutoConfig")
# Lets AutoConfig (and AutoTokenizer, which reads config.json) resolve "gsva" once this module is imported.
AutoConfig.register("gsva", GSVAConfig, exist_ok=True)
