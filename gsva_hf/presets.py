"""Model presets: the tiny random-init model for tests and the synthetic task, and the GSVA-7B/13B shapes.

`python -m gsva_hf.presets configs/` rewrites every preset folder. The tiny preset ships a small BPE tokenizer
trained here on GSVA's prompt text and the synthetic task's words, so it runs with no download.
"""

import argparse
import inspect
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast, SamImageProcessorPil

from configuration_gsva import GSVAConfig
from gsva_hf.data.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    LONG_QUESTION_LIST,
    SHORT_QUESTION_LIST,
    SHORT_QUESTION_LIST_MODE4,
)
from processing_gsva import MULTI_TARGET_ANSWER_STYLES, SYSTEM_PROMPTS, GSVAProcessor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SAM_MEAN = [0.485, 0.456, 0.406]  # 123.675/255, 116.28/255, 103.53/255
SAM_STD = [0.229, 0.224, 0.225]  # 58.395/255, 57.12/255, 57.375/255

TINY_WORDS = (
    "red green blue yellow purple orange white black cyan pink gray brown "
    "circle square triangle star diamond cross ring hexagon shape shapes object objects "
    "left right top bottom above below middle center next to of the a an and or with in on at is are "
    "big small large tiny biggest smallest largest two three all every each other one both near far "
    "image picture photo mask masks segmentation segment result results sure it they this that there "
    "man woman person dog cat car bus tree sky people shirt chair table cup bottle window door "
    "no not none nothing found present missing empty what which where who why how please output respond"
)


def tiny_tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every GSVA template plus the synthetic task's words."""
    lines = list(SYSTEM_PROMPTS.values())
    lines += ["USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>"]
    lines += SHORT_QUESTION_LIST + SHORT_QUESTION_LIST_MODE4 + LONG_QUESTION_LIST + EXPLANATORY_QUESTION_LIST
    lines += ANSWER_LIST + [" ".join(style) for style in MULTI_TARGET_ANSWER_STYLES]
    lines = [line.replace("[SEG]", " ").replace("[REJ]", " ") for line in lines]
    lines += [TINY_WORDS] * 20
    lines += [" ".join(chr(c) for c in range(32, 127))]
    return lines


def build_tiny_tokenizer(vocab_size: int = 640, gsva_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A Llama-style (metaspace) BPE tokenizer with `<unk>`, `<s>`, `</s>` and every printable ASCII char."""
    model = models.BPE(unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["\u2581", "\n"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=1024
    )
    if gsva_tokens:
        GSVAProcessor.add_gsva_tokens(fast)
    return fast


def sam_config(size: str) -> dict:
    """transformers `SamConfig` kwargs for SAM ViT-B/L/H (segment-anything's `build_sam_vit_*`)."""
    vision = {
        "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
        "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
        "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    }[size]
    vision.update(image_size=1024, patch_size=16, output_channels=256, window_size=14, use_rel_pos=True, mlp_ratio=4.0)
    vision["mlp_dim"] = vision["hidden_size"] * 4
    # segment-anything's two-way transformer uses LayerNorm's default eps (1e-5), transformers' SAM 1e-6.
    return {"vision_config": vision, "prompt_encoder_config": {}, "mask_decoder_config": {"layer_norm_eps": 1e-5}}


CLIP_VIT_L_14 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def llama_config(width: int, layers: int, heads: int, intermediate: int, vocab: int, eps: float, positions: int) -> dict:
    return dict(
        model_type="llama",
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        rms_norm_eps=eps,
        max_position_embeddings=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def large_presets() -> dict[str, tuple[GSVAConfig, dict]]:
    """GSVA-7B / 13B / 13B-llama2 configs and their processor settings (ids from the original tokenizers).

    7B (LLaVA-Lightning-7B-v1-1) already has `<im_patch>`=32000, unused by GSVA: it is the image token, so the
    vocabulary stays 32005 as in `gsva-7b-*.bin`. The 13B bases have 32000 tokens: `[SEG]`, `[REJ]`,
    `<im_start>`, `<im_end>` get 32000-32003 and the image token `<image>` one more row (32004).
    """
    ids_7b = dict(image_token_id=32000, im_start_token_id=32001, im_end_token_id=32002, seg_token_id=32003, rej_token_id=32004)
    ids_13b = dict(seg_token_id=32000, rej_token_id=32001, im_start_token_id=32002, im_end_token_id=32003, image_token_id=32004)

    def preset(text_config: dict, ids: dict, conv_template: str, image_token: str) -> tuple[GSVAConfig, dict]:
        """CLIP ViT-L/14 and SAM ViT-H (every GSVA release) around `text_config`."""
        config = GSVAConfig(vision_config=CLIP_VIT_L_14, text_config=text_config, sam_config=sam_config("vit_h"), **ids)
        return config, {"conv_template": conv_template, "image_token": image_token}

    return {
        "gsva-7b": preset(llama_config(4096, 32, 32, 11008, 32005, 1e-6, 2048), ids_7b, "llava_v1", "<im_patch>"),
        "gsva-13b": preset(llama_config(5120, 40, 40, 13824, 32005, 1e-6, 2048), ids_13b, "llava_v1", "<image>"),
        "gsva-13b-llama2": preset(llama_config(5120, 40, 40, 13824, 32005, 1e-5, 4096), ids_13b, "llava_llama_2", "<image>"),
    }


def tiny_config(token_ids: dict[str, int], vocab_size: int) -> GSVAConfig:
    """Sizes that trained fastest on 2 CPU cores (see BENCHMARKS.md): 64 image tokens, SAM at 128 px."""
    return GSVAConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=128,
            patch_size=16,
            projection_dim=64,
        ),
        text_config=llama_config(128, 2, 4, 512, vocab_size, 1e-6, 1024),
        sam_config={
            "vision_config": dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=128,
                patch_size=8,
                output_channels=64,
                window_size=0,
                global_attn_indexes=[0, 1],
                use_rel_pos=False,
                num_pos_feats=32,
                initializer_range=0.02,
            ),
            "prompt_encoder_config": dict(hidden_size=64, image_size=128, patch_size=8, mask_input_channels=16),
            "mask_decoder_config": dict(
                hidden_size=64, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=64, layer_norm_eps=1e-5
            ),
        },
        out_dim=64,
        **token_ids,
    )


def image_processors(clip_size: int, sam_size: int) -> tuple[CLIPImageProcessorPil, SamImageProcessorPil]:
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": clip_size},
        crop_size={"height": clip_size, "width": clip_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    sam = SamImageProcessorPil(
        size={"longest_edge": sam_size},
        pad_size={"height": sam_size, "width": sam_size},
        image_mean=SAM_MEAN,
        image_std=SAM_STD,
    )
    return clip, sam


def tiny_processor() -> GSVAProcessor:
    clip, sam = image_processors(128, 128)
    return GSVAProcessor(clip, sam, build_tiny_tokenizer(), num_image_tokens=64)


# The code files `save_pretrained` copies beside a custom config or processor: the only .py files ever removed.
CODE_FILE_NAMES = {Path(inspect.getfile(cls)).name for cls in (GSVAConfig, GSVAProcessor)}


def _drop_code_references(folder: Path) -> None:
    """Preset folders are plain configs for this repo's classes: no code copies, no `auto_map`."""
    for code_file in folder.glob("*.py"):
        if code_file.name in CODE_FILE_NAMES and not code_file.is_symlink():
            code_file.unlink()
    for json_file in folder.rglob("*.json"):
        data = json.loads(json_file.read_text())
        if isinstance(data, dict) and _strip_auto_map(data):
            json_file.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _strip_auto_map(data: dict) -> bool:
    changed = data.pop("auto_map", None) is not None
    for value in data.values():
        if isinstance(value, dict):
            changed = _strip_auto_map(value) or changed
    return changed


def write_presets(root: Path) -> None:
    root = Path(root)
    processor = tiny_processor()
    config = tiny_config(processor.token_ids, len(processor.tokenizer))
    processor.check_config(config)
    config.save_pretrained(root / "gsva-tiny")
    processor.save_pretrained(root / "gsva-tiny")
    written = [root / "gsva-tiny"]  # only the folders written here are cleaned, never others in `root`
    for name, (config, processor_kwargs) in large_presets().items():
        folder = root / name
        written.append(folder)
        config.save_pretrained(folder)
        clip, sam = image_processors(224, 1024)
        clip.save_pretrained(folder / "image_processor")
        sam.save_pretrained(folder / "sam_image_processor")
        (folder / "processor_settings.json").write_text(
            json.dumps({**processor_kwargs, "num_image_tokens": config.num_image_tokens}, indent=2, allow_nan=False) + "\n"
        )
    for folder in written:
        _drop_code_references(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write the preset folders into (e.g. configs/)")
    write_presets(parser.parse_args(argv).root)


if __name__ == "__main__":
    main()
