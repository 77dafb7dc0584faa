"""Configuration of GSVA: LLaVA (CLIP vision tower + projector + causal LM) with a SAM mask head.

Shipped with a Hub repository for ``trust_remote_code``: imports only torch and transformers.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class GSVAConfig(PreTrainedConfig):
    r"""
    Composite configuration: ``vision_config`` (CLIP vision), ``text_config`` (any causal LM the Auto classes
    know; Llama by default) and ``sam_config`` (transformers ``SamConfig``).

    projector_type (`str`, defaults to `"linear"`):
        `"linear"` (one `Linear`, LLaVA v1 as GSVA uses) or `"mlp2x_gelu"` (`Linear-GELU-Linear`, LLaVA-1.5).
    vision_feature_layer (`int`, defaults to -2):
        CLIP hidden-state index whose patch features feed the projector.
    vision_feature_select_strategy (`str`, defaults to `"default"`):
        `"default"` drops the CLS token (LLaVA's "patch"), `"full"` keeps it.
    image_token_id, seg_token_id, rej_token_id, im_start_token_id, im_end_token_id (`int`):
        Vocabulary ids of the image placeholder, `[SEG]`, `[REJ]`, `<im_start>` and `<im_end>`. They must match
        the processor's tokenizer; `GSVAProcessor` checks this when it is given a config.
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
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "sam_config": SubConfigSpec(config_class=AutoConfig, model_type="sam"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["linear", "mlp2x_gelu"] = "linear"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token_id: int = 32000
    seg_token_id: int = 32003
    rej_token_id: int = 32004
    im_start_token_id: int = 32001
    im_end_token_id: int = 32002
    out_dim: int = 256
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    seg_rej_ce_weight: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
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
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"GSVAConfig special token ids must be distinct, got {ids}")

    @property
    def num_image_tokens(self) -> int:
        """Number of visual tokens one image becomes (256 for CLIP ViT-L/14 at 224 px without CLS)."""
        per_side = self.vision_config.image_size // self.vision_config.patch_size
        return per_side * per_side + (1 if self.vision_feature_select_strategy == "full" else 0)


__all__ = ["GSVAConfig"]

GSVAConfig.register_for_auto_class("AutoConfig")
# Lets AutoConfig (and AutoTokenizer, which reads config.json) resolve "gsva" once this module is imported.
AutoConfig.register("gsva", GSVAConfig, exist_ok=True)
