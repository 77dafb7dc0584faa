"""Tiny random "Hub-like" folders of VLM families and SAM-family mask decoders, for tests and benchmarks.

Each `save_*` writes what `save_pretrained` writes for a real Hub repo (weights as safetensors, config, tokenizer with
its chat template, image processor, and the processor where its class can be built without torchvision), so code that
composes a VLM with a mask decoder is exercised on the same files it meets on the Hub, offline and in seconds.
The tokenizers are a small BPE trained here plus each family's special tokens; they add no special tokens on their
own, the chat templates write the BOS where the family starts with one. Image processors are built as the PIL class
and saved under the name a real repo carries (the torchvision one), which loads as its PIL twin without torchvision.
"""

import json
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    SamImageProcessorPil,
    SmolVLMImageProcessorPil,
    TimmWrapperConfig,
)
from transformers.utils import is_timm_available

from gsva_hf.presets import build_tiny_tokenizer

VLM_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava", "idefics3", "smolvlm", "gemma3")
MASK_DECODER_FAMILIES = ("sam", "sam_hq", "sam2", "edgetam")

# Text model sizes shared by every tiny VLM and the text-only LM.
TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, TEXT_KV_HEADS, TEXT_INTERMEDIATE = 64, 2, 4, 2, 128
# Every tiny mask decoder takes 256 px images, embeds them at 16x16 and returns 64x64 low-resolution masks.
MASK_IMAGE_SIZE, MASK_EMBEDDING_SIDE, MASK_LOW_RES_SIDE, MASK_PROMPT_WIDTH = 256, 16, 64, 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# Image placeholder each family's chat template writes for a `{"type": "image"}` item; its processor expands it.
IMAGE_PLACEHOLDERS = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "gemma3": "<start_of_image>",
}

_QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
_QWEN_TOKENS += ["<|image_pad|>", "<|video_pad|>"]
_IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
_IDEFICS_TOKENS += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
_QWEN_NAMED = {
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Per family: the special tokens added to the tiny BPE, and the tokenizer's named tokens among them (or the BPE's own
# `<s>`, `</s>`, `<unk>`).
_TOKENS = {
    "qwen2_5_vl": (_QWEN_TOKENS, _QWEN_NAMED),
    "qwen3_vl": (_QWEN_TOKENS, _QWEN_NAMED),
    "llava": (["<image>", "<pad>"], {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}),
    "idefics3": (
        ["<|begin_of_text|>", "<pad>"] + _IDEFICS_TOKENS,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>", "pad_token": "<pad>"},
    ),
    "smolvlm": (
        ["<|im_start|>", "<|im_end|>"] + _IDEFICS_TOKENS,
        {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"},
    ),
    "gemma3": (
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
        + ["<image_soft_token>"],
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    ),
}
# The token that ends an assistant turn, where it is not the tokenizer's EOS: `generate` stops on both.
_TURN_END = {"gemma3": "<end_of_turn>"}

# Chat templates, one per turn format, written for these tiny folders. `{image}` is the family's placeholder.
_CONTENT_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' -%}{{ '@IMAGE@' }}"
    "{%- elif item.type == 'text' -%}{{ item.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_CHATML = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message.role != 'system' and '@SYSTEM@' -%}"
    "{{ '<|im_start|>system\\n@SYSTEM@<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message.role + '\\n' }}{{ render(message.content) }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_VICUNA = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ render(message.content) + ' ' }}"
    "{%- elif message.role == 'user' -%}{{ 'USER: ' + render(message.content) + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + render(message.content) + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
_IDEFICS = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ message.role | capitalize }}"
    "{%- if message.content is not string and message.content[0].type == 'image' -%}{{ ':' }}"
    "{%- else -%}{{ ': ' }}{%- endif -%}"
    "{{ render(message.content) + '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)
_GEMMA = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = ns.system + render(message.content) + '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' }}"
    "{{ ns.system + render(message.content) + '<end_of_turn>\\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_TEMPLATES = {
    "qwen2_5_vl": _CHATML.replace("@SYSTEM@", "You are a helpful assistant."),
    "qwen3_vl": _CHATML.replace("@SYSTEM@", ""),
    "llava": _VICUNA,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "gemma3": _GEMMA,
}
# LLaVA-1.5 puts each image on its own line before the text.
_TEMPLATE_IMAGE = {**IMAGE_PLACEHOLDERS, "llava": "<image>\n"}


def _check_family(family: str, known: tuple) -> None:
    if family not in known:
        raise ValueError(f"family: expected one of {', '.join(known)}, got {family!r}")


def chat_template(family: str) -> str:
    """The Jinja chat template saved with the tiny `family` folder (the family's turn format, written here)."""
    _check_family(family, VLM_FAMILIES)
    return _CONTENT_MACRO.replace("@IMAGE@", _TEMPLATE_IMAGE[family].replace("\n", "\\n")) + _TEMPLATES[family]


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tiny BPE with `family`'s special tokens (as special tokens) and named tokens, and its chat template."""
    _check_family(family, VLM_FAMILIES)
    specials, named = _TOKENS[family]
    backend = build_tiny_tokenizer(gsva_tokens=False).backend_tokenizer
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", model_max_length=4096, **named)
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def _ids(family: str) -> dict:
    """Token ids the config must agree on, from the tokenizer `tiny_tokenizer(family)` builds (same for any seed)."""
    tokenizer = tiny_tokenizer(family)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _TOKENS[family][1].items()}
    ids["vocab_size"] = len(tokenizer)
    for token in ["<image>", "<end_of_turn>"]:
        ids[token] = tokenizer.convert_tokens_to_ids(token)
    return ids


def _text_config(ids: dict, **extra) -> dict:
    return dict(
        vocab_size=ids["vocab_size"],
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        bos_token_id=ids.get("bos_token"),
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        **extra,
    )


def tiny_vlm_config(family: str) -> PreTrainedConfig:
    """A random-init-sized config of `family`'s `AutoModelForImageTextToText` class: text hidden 64, 2 layers,
    4 heads (2 KV heads), a 1-2 layer vision tower, and 9-20 image tokens for a 96x96 image."""
    _check_family(family, VLM_FAMILIES)
    ids = _ids(family)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        qwen3 = family == "qwen3_vl"
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2] if qwen3 else [2, 3, 3]}
        if qwen3:
            rope["mrope_interleaved"] = True
        text = _text_config(ids, rope_parameters=rope, **({"head_dim": TEXT_HIDDEN // TEXT_HEADS} if qwen3 else {}))
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN)
        if qwen3:
            vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        else:
            vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1])
        return AutoConfig.for_model(
            family,
            text_config=text,
            vision_config=vision,
            image_token_id=ids["image_token"],
            video_token_id=ids["video_token"],
            vision_start_token_id=ids["vision_start_token"],
            vision_end_token_id=ids["vision_end_token"],
        )
    if family == "llava":
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            projection_dim=32,
        )
        return AutoConfig.for_model(
            "llava",
            text_config=_text_config(ids, model_type="llama"),
            vision_config=vision,
            image_token_index=ids["<image>"],
            image_seq_length=16,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family in ("idefics3", "smolvlm"):
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision.update(image_size=32, patch_size=8)
        return AutoConfig.for_model(
            family,
            text_config=_text_config(ids, model_type="llama"),
            vision_config=vision,
            image_token_id=ids["<image>"],
            scale_factor=2,
            pad_token_id=ids["pad_token"],
        )
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    text = _text_config(ids, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=32)
    text["layer_types"] = ["sliding_attention", "full_attention"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=64, patch_size=8, vision_use_head=False)
    return AutoConfig.for_model(
        "gemma3",
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )


def tiny_image_processor(family: str):
    """`family`'s image processor at the tiny sizes (the PIL class: the same pixels with or without torchvision)."""
    _check_family(family, VLM_FAMILIES)
    if family == "qwen2_5_vl":
        return Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14)
    if family == "qwen3_vl":
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
            patch_size=16,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    if family == "llava":
        return CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    if family in ("idefics3", "smolvlm"):
        kind = Idefics3ImageProcessorPil if family == "idefics3" else SmolVLMImageProcessorPil
        return kind(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return Gemma3ImageProcessorPil(size={"height": 64, "width": 64})


def _tiny_processor(family: str, tokenizer, image_processor):
    """The family's real processor where it can be built without torchvision or num2words, else None."""
    template = tokenizer.chat_template
    if family == "llava":
        return LlavaProcessor(
            image_processor,
            tokenizer,
            patch_size=16,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family == "idefics3":
        return Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=template)
    if family == "gemma3":
        return Gemma3Processor(image_processor, tokenizer, image_seq_length=16, chat_template=template)
    return None


def _name_torchvision_class(path: Path) -> None:
    """Write the image processor class as a real repo names it (`XImageProcessor`, not this machine's `XPil`)."""
    data = json.loads(path.read_text())
    settings = data.get("image_processor", data)
    settings["image_processor_type"] = settings["image_processor_type"].removesuffix("Pil")
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def save_tiny_vlm(family: str, folder, seed: int = 0) -> Path:
    """Save a random tiny `family` VLM as a Hub-like folder: model (safetensors), tokenizer with chat template,
    image processor, and `processor_config.json` where the real processor builds here. Deterministic for a seed."""
    _check_family(family, VLM_FAMILIES)
    folder = Path(folder)
    config = tiny_vlm_config(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    tokenizer = tiny_tokenizer(family)
    eos = [tokenizer.eos_token_id]
    if family in _TURN_END:
        eos.append(tokenizer.convert_tokens_to_ids(_TURN_END[family]))
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    image_processor = tiny_image_processor(family)
    processor = _tiny_processor(family, tokenizer, image_processor)
    if processor is not None:
        processor.save_pretrained(folder)
    else:
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
    _name_torchvision_class(folder / ("preprocessor_config.json" if processor is None else "processor_config.json"))
    return folder


def tiny_mask_decoder_config(family: str) -> PreTrainedConfig:
    """A tiny SAM-family config: 256 px input, 16x16 image embedding of width 32, 64x64 low-resolution masks;
    SAM 2-style decoders with `dynamic_multimask_via_stability` off (a head trains on the single-mask token)."""
    _check_family(family, MASK_DECODER_FAMILIES)
    width = MASK_PROMPT_WIDTH
    prompt = dict(hidden_size=width, image_size=MASK_IMAGE_SIZE, patch_size=16, mask_input_channels=8)
    decoder = dict(hidden_size=width, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32)
    if family in ("sam", "sam_hq"):
        vision = dict(
            hidden_size=32,
            output_channels=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=MASK_IMAGE_SIZE,
            patch_size=16,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=width // 2,
            mlp_dim=64,
        )
        if family == "sam_hq":
            decoder["vit_dim"] = vision["hidden_size"]
        return AutoConfig.for_model(
            family, vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
        )
    decoder["dynamic_multimask_via_stability"] = False
    side = MASK_IMAGE_SIZE // 4
    feature_sizes = [[side, side], [side // 2, side // 2], [side // 4, side // 4]]
    if family == "sam2":
        dims = [16, 32, 64, 128]
        backbone = dict(
            model_type="sam2_hiera_det_model",
            hidden_size=dims[0],
            num_attention_heads=1,
            image_size=[MASK_IMAGE_SIZE, MASK_IMAGE_SIZE],
            blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=dims,
            num_attention_heads_per_stage=[1, 1, 2, 2],
            window_size_per_stage=[8, 4, 8, 4],
            global_attention_blocks=[3],
            window_positional_embedding_background_size=[4, 4],
        )
    else:
        # RepViT-M1's four stages (48-384 channels at strides 4-32), as EdgeTAM uses it.
        dims = [48, 96, 192, 384]
        # Built as an instance: `TimmWrapperConfig.from_dict` (what a dict goes through) requires timm.
        backbone = TimmWrapperConfig(
            architecture="repvit_m1.dist_in1k",
            model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
        )
    vision = dict(
        backbone_config=backbone,
        backbone_channel_list=dims[::-1],
        backbone_feature_sizes=feature_sizes,
        fpn_hidden_size=width,
    )
    return AutoConfig.for_model(family, vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def _sam2_image_processor_dict() -> dict:
    """`Sam2ImageProcessor`'s settings at the tiny size (the class needs torchvision, so it is written out)."""
    return {
        "image_processor_type": "Sam2ImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": MASK_IMAGE_SIZE, "width": MASK_IMAGE_SIZE},
        "mask_size": {"height": MASK_LOW_RES_SIDE, "width": MASK_LOW_RES_SIDE},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }


def save_tiny_mask_decoder(family: str, folder, seed: int = 0) -> Path:
    """Save a random tiny SAM-family model (`AutoModel`) and its `preprocessor_config.json` as a Hub repo has them.
    EdgeTAM's image encoder is a timm RepViT: without timm this raises ImportError (its config still builds)."""
    _check_family(family, MASK_DECODER_FAMILIES)
    if family == "edgetam" and not is_timm_available():
        raise ImportError("save_tiny_mask_decoder('edgetam'): EdgeTAM's image encoder is a timm RepViT; install timm")
    folder = Path(folder)
    config = tiny_mask_decoder_config(family)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    if family in ("sam", "sam_hq"):
        SamImageProcessorPil(
            size={"longest_edge": MASK_IMAGE_SIZE},
            pad_size={"height": MASK_IMAGE_SIZE, "width": MASK_IMAGE_SIZE},
            mask_size={"longest_edge": MASK_LOW_RES_SIDE},
            mask_pad_size={"height": MASK_LOW_RES_SIDE, "width": MASK_LOW_RES_SIDE},
        ).save_pretrained(folder)
        _name_torchvision_class(folder / "preprocessor_config.json")
    else:
        text = json.dumps(_sam2_image_processor_dict(), indent=2, sort_keys=True) + "\n"
        (folder / "preprocessor_config.json").write_text(text)
    return folder


def mask_image_features(model, pixel_values: torch.Tensor) -> dict:
    """What a SAM-family decoder needs from the image encoder (backbones.md B.2): `image_embeddings`, plus
    SAM-HQ's `intermediate_embeddings` or SAM 2's `high_resolution_features`. For tests and benchmarks only."""
    features = model.get_image_embeddings(pixel_values)
    if isinstance(features, torch.Tensor):
        return {"image_embeddings": features}
    if model.config.model_type == "sam_hq":
        return {"image_embeddings": features[0], "intermediate_embeddings": features[1]}
    return {"image_embeddings": features[-1], "high_resolution_features": list(features[:-1])}


def decode_mask_prompts(model, features: dict, prompts: torch.Tensor) -> torch.Tensor:
    """Low-resolution masks `(B, P, h, w)` for `prompts` `(B, P, C)`, each one sparse prompt token, no points, boxes
    or mask input, single-mask output (backbones.md B.2). For tests and benchmarks only."""
    embeddings = features["image_embeddings"]
    batch, _, height, width = embeddings.shape
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
    extra = {key: value for key, value in features.items() if key != "image_embeddings"}
    if model.config.model_type == "sam_hq":
        extra["hq_token_only"] = False
    outputs = model.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=model.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1),
        sparse_prompt_embeddings=prompts[:, :, None, :],
        dense_prompt_embeddings=dense,
        multimask_output=False,
        **extra,
    )
    return outputs[0][:, :, 0]


def save_tiny_text_lm(folder, seed: int = 0) -> Path:
    """A tiny text-only Llama (`AutoModelForCausalLM`) with the tiny tokenizer: not a VLM, for refusal tests."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(gsva_tokens=False)
    tokenizer.pad_token = tokenizer.unk_token
    config = AutoConfig.for_model(
        "llama", **_text_config({"vocab_size": len(tokenizer), "bos_token": 1, "eos_token": 2, "pad_token": 0})
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_non_sam_mask_model(folder, seed: int = 0) -> Path:
    """A tiny MaskFormer (Swin backbone, no timm): a mask model that is not SAM-family, for refusal tests."""
    folder = Path(folder)
    backbone = dict(
        model_type="swin",
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    decoder = dict(model_type="detr", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2)
    decoder.update(decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=4)
    config = AutoConfig.for_model(
        "maskformer", backbone_config=backbone, decoder_config=decoder, fpn_feature_size=32, mask_feature_size=32
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    """`python -m gsva_hf.tiny_parts --vlm qwen2_5_vl --mask-decoder sam2 --out parts`: tiny random folders to try
    `gsva-compose` offline."""
    from gsva_hf.cli import CommandParser, UsageError, usage_errors

    parser = CommandParser(prog="python -m gsva_hf.tiny_parts", description=main.__doc__.splitlines()[0])
    parser.add_argument("--vlm", choices=VLM_FAMILIES, default="qwen2_5_vl", help="VLM family")
    parser.add_argument("--mask-decoder", choices=MASK_DECODER_FAMILIES, default="sam2", help="mask decoder family")
    parser.add_argument("--out", type=Path, required=True, help="folder to write OUT/VLM and OUT/MASK_DECODER into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with usage_errors(parser.prog, args.debug):
        for name in (args.vlm, args.mask_decoder):
            if (args.out / name).exists():
                raise UsageError(f"--out {args.out}: {args.out / name} exists; give a new folder")
        save_tiny_vlm(args.vlm, args.out / args.vlm, seed=args.seed)
        save_tiny_mask_decoder(args.mask_decoder, args.out / args.mask_decoder, seed=args.seed)
    print(f"wrote {args.out / args.vlm} and {args.out / args.mask_decoder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
