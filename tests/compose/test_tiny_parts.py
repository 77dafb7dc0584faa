"""The tiny Hub-like VLM and mask-decoder folders: they load offline through the Auto classes, their chat templates
render images the way each family's processor expects, inputs built by hand (backbones.md A.5) run the model and
equal the real processor's where it loads, and every SAM-family decoder gives the same embedding and mask sizes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.utils import is_timm_available

from gsva_hf import tiny_parts
from gsva_hf.tiny_parts import (
    IMAGE_PLACEHOLDERS,
    MASK_DECODER_FAMILIES,
    MASK_EMBEDDING_SIDE,
    MASK_IMAGE_SIZE,
    MASK_LOW_RES_SIDE,
    MASK_PROMPT_WIDTH,
    VLM_FAMILIES,
)

REAL_PROCESSOR = ("llava", "idefics3", "gemma3")  # the processors that build without torchvision / num2words
BUILDABLE_MASK = [family for family in MASK_DECODER_FAMILIES if family != "edgetam" or is_timm_available()]
IMAGE_TOKEN = {"qwen2_5_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>", "gemma3": "<image_soft_token>"}
HUB_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
QUESTION = "What is the red circle?"
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
]


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def vlm(request, tmp_path_factory):
    """One saved tiny VLM folder per family, loaded back through the Auto classes."""
    family = request.param
    folder = tiny_parts.save_tiny_vlm(family, tmp_path_factory.mktemp(family))
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return family, folder, model, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


def image_token(family: str) -> str:
    return IMAGE_TOKEN.get(family, "<image>")


def expand_placeholder(family: str, text: str, pixel: dict, config, image_processor) -> str:
    """The family's processor rule for the one image in `text` (backbones.md A.3)."""
    placeholder = IMAGE_PLACEHOLDERS[family]
    assert text.count(placeholder) == 1
    token = image_token(family)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        count = int(pixel["image_grid_thw"][0].prod()) // image_processor.merge_size**2
        return text.replace(token, token * count)
    if family == "llava":
        patch = config.vision_config.patch_size
        height, width = pixel["pixel_values"].shape[-2:]
        # One CLS token is added, and dropped again by the "default" feature strategy.
        return text.replace(placeholder, token * ((height // patch) * (width // patch)))
    if family == "gemma3":
        block = f"\n\n<start_of_image>{token * config.mm_tokens_per_image}<end_of_image>\n\n"
        return text.replace(placeholder, block)
    vision = config.vision_config
    per_crop = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    crop = token * per_crop
    rows, cols = pixel["rows"][0][0], pixel["cols"][0][0]
    tiles = "".join(
        "".join(f"<fake_token_around_image><row_{i + 1}_col_{j + 1}>{crop}" for j in range(cols)) + "\n"
        for i in range(rows)
    )
    glob = f"<fake_token_around_image><global-img>{crop}<fake_token_around_image>"
    return text.replace(placeholder, tiles + "\n" + glob if rows or cols else glob)


def hand_built_inputs(family, config, tokenizer, image_processor, image, drop_image_tokens: int = 0) -> dict:
    """Processor output built from the tokenizer, the image processor and the expansion rule (backbones.md A.5)."""
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    extra = {"return_row_col_info": True} if family in ("idefics3", "smolvlm") else {}
    pixel = image_processor(images=[image], return_tensors="pt", **extra)
    text = expand_placeholder(family, text, pixel, config, image_processor)
    text = text.replace(image_token(family), "", drop_image_tokens)
    inputs = dict(tokenizer([text], return_tensors="pt"))
    inputs.update({key: value for key, value in pixel.items() if key not in ("rows", "cols", "num_crops")})
    is_image = (inputs["input_ids"] == config.image_token_id).int()
    if family in ("qwen2_5_vl", "qwen3_vl"):
        inputs["mm_token_type_ids"] = is_image
    if family == "gemma3":
        inputs["token_type_ids"] = is_image
    return inputs


def test_vlm_folder_is_a_hub_repo(vlm):
    family, folder, model, tokenizer, image_processor = vlm
    names = {path.name for path in folder.iterdir()}
    assert HUB_FILES <= names
    assert ("processor_config.json" in names) == (family in REAL_PROCESSOR)
    assert "preprocessor_config.json" in names or "processor_config.json" in names
    assert model.config.model_type == family
    assert type(model).__name__ == model.config.architectures[0]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == [type(model).__name__]
    built = type(tiny_parts.tiny_image_processor(family)).__name__
    assert type(image_processor).__name__.removesuffix("Pil") == built.removesuffix("Pil")


def test_vlm_config_ids_are_the_tokenizers(vlm):
    family, _, model, tokenizer, _ = vlm
    config, text = model.config, model.config.get_text_config()
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(image_token(family))
    assert text.vocab_size == len(tokenizer)
    assert text.eos_token_id == tokenizer.eos_token_id
    assert text.pad_token_id == tokenizer.pad_token_id
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    if family == "gemma3":
        assert config.boi_token_id == tokenizer.convert_tokens_to_ids("<start_of_image>")
        assert config.eoi_token_id == tokenizer.convert_tokens_to_ids("<end_of_image>")
        assert text.bos_token_id == tokenizer.bos_token_id
    # Family tokens are special: never split by the BPE, skipped when decoding.
    ids = tokenizer(IMAGE_PLACEHOLDERS[family], add_special_tokens=False).input_ids
    assert len(ids) == len(IMAGE_PLACEHOLDERS[family].split("><"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == ""


def test_chat_template_renders_images_and_turns(vlm):
    family, _, _, tokenizer, _ = vlm
    turns = MESSAGES + [{"role": "assistant", "content": "A ring."}, {"role": "user", "content": "And the square?"}]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    history = tokenizer.apply_chat_template(turns, tokenize=False)
    assert prompt.count(IMAGE_PLACEHOLDERS[family]) == 1
    assert prompt.index("Answer briefly.") < prompt.index(IMAGE_PLACEHOLDERS[family]) < prompt.index(QUESTION)
    assert prompt.index(QUESTION) < prompt.index("A ring.") < prompt.index("And the square?")
    assert prompt.startswith(history) and len(prompt) > len(history)
    as_list = [{"role": "user", "content": [{"type": "text", "text": "And the square?"}]}]
    as_text = [{"role": "user", "content": "And the square?"}]
    assert tokenizer.apply_chat_template(as_list, tokenize=False) == tokenizer.apply_chat_template(
        as_text, tokenize=False
    )


def test_hand_built_inputs_run_the_model(vlm, image):
    family, _, model, tokenizer, image_processor = vlm
    inputs = hand_built_inputs(family, model.config, tokenizer, image_processor, image)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 9 <= image_tokens <= 64
    short = hand_built_inputs(family, model.config, tokenizer, image_processor, image, drop_image_tokens=1)
    with pytest.raises((ValueError, RuntimeError)), torch.no_grad():
        model(**short)  # the model's own placeholder-count check


@pytest.mark.parametrize("family", REAL_PROCESSOR)
def test_hand_built_inputs_equal_the_real_processor(family, tmp_path_factory, image):
    folder = tiny_parts.save_tiny_vlm(family, tmp_path_factory.mktemp(f"processor_{family}"))
    config = AutoConfig.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    ours = hand_built_inputs(family, config, AutoTokenizer.from_pretrained(folder), image_processor, image)
    with_image = [{"type": "image", "image": image}, MESSAGES[1]["content"][1]]
    messages = [MESSAGES[0], {"role": "user", "content": with_image}]
    theirs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert int((ours["input_ids"] == tokenizer.convert_tokens_to_ids(image_token(family))).sum()) > 1


def test_same_seed_same_folder(tmp_path):
    first = tiny_parts.save_tiny_vlm("llava", tmp_path / "a", seed=3)
    again = tiny_parts.save_tiny_vlm("llava", tmp_path / "b", seed=3)
    other = tiny_parts.save_tiny_vlm("llava", tmp_path / "c", seed=4)
    for name in ["config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    weights = [load_file(folder / "model.safetensors") for folder in (first, again, other)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="family: expected one of .*got 'blip2'"):
        tiny_parts.tiny_vlm_config("blip2")
    with pytest.raises(ValueError, match="family: expected one of sam, sam_hq, sam2, edgetam"):
        tiny_parts.save_tiny_mask_decoder("sam3", "unused")


@pytest.fixture(scope="module")
def mask_models(tmp_path_factory):
    """Each SAM-family folder that can be instantiated here, loaded back with `AutoModel`."""
    loaded = {}
    for family in BUILDABLE_MASK:
        folder = tiny_parts.save_tiny_mask_decoder(family, tmp_path_factory.mktemp(family))
        loaded[family] = folder, AutoModel.from_pretrained(folder).eval()
    return loaded


def test_mask_configs_agree_on_sizes():
    for family in MASK_DECODER_FAMILIES:
        config = tiny_parts.tiny_mask_decoder_config(family)
        prompt = config.prompt_encoder_config
        assert config.model_type == family
        assert (prompt.image_size, prompt.image_size // prompt.patch_size) == (MASK_IMAGE_SIZE, MASK_EMBEDDING_SIDE)
        assert prompt.hidden_size == config.mask_decoder_config.hidden_size == MASK_PROMPT_WIDTH
        if family in ("sam", "sam_hq"):
            assert config.vision_config.num_pos_feats == prompt.hidden_size // 2
            assert config.vision_config.output_channels == prompt.hidden_size
        else:
            assert config.vision_config.backbone_feature_sizes[-1] == [MASK_EMBEDDING_SIDE] * 2
            assert config.vision_config.fpn_hidden_size == prompt.hidden_size
            assert config.mask_decoder_config.dynamic_multimask_via_stability is False
    edgetam_backbone = tiny_parts.tiny_mask_decoder_config("edgetam").vision_config.backbone_config
    assert edgetam_backbone.architecture.startswith("repvit")


@pytest.mark.skipif(is_timm_available(), reason="timm is installed: EdgeTAM builds")
def test_edgetam_without_timm_names_timm(tmp_path):
    with pytest.raises(ImportError, match="timm"):
        tiny_parts.save_tiny_mask_decoder("edgetam", tmp_path)
    assert not any(tmp_path.iterdir())


def test_mask_folders_load_with_their_image_processor(mask_models):
    assert set(mask_models) >= {"sam", "sam_hq", "sam2"}
    for family, (folder, model) in mask_models.items():
        assert model.config.model_type == family
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        if family in ("sam", "sam_hq"):
            assert settings["image_processor_type"] == "SamImageProcessor"
            pixel = AutoImageProcessor.from_pretrained(folder)(images=Image.new("RGB", (300, 200)), return_tensors="pt")
            assert pixel["pixel_values"].shape == (1, 3, MASK_IMAGE_SIZE, MASK_IMAGE_SIZE)
            assert pixel["reshaped_input_sizes"].tolist() == [[171, 256]]
        else:
            assert settings["image_processor_type"] == "Sam2ImageProcessor"
            assert settings["size"] == {"height": MASK_IMAGE_SIZE, "width": MASK_IMAGE_SIZE}
            assert settings["image_mean"] == [0.485, 0.456, 0.406] and settings["rescale_factor"] == 1 / 255


def test_mask_decoders_share_embedding_and_mask_sizes(mask_models):
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, MASK_IMAGE_SIZE, MASK_IMAGE_SIZE)
    prompts = torch.randn(2, 1, MASK_PROMPT_WIDTH)
    for family, (_, model) in mask_models.items():
        with torch.no_grad():
            features = tiny_parts.mask_image_features(model, pixel_values)
            masks = tiny_parts.decode_mask_prompts(model, features, prompts)
            other = tiny_parts.decode_mask_prompts(model, features, prompts.flip(0))
        side = MASK_EMBEDDING_SIDE
        assert features["image_embeddings"].shape == (2, MASK_PROMPT_WIDTH, side, side), family
        assert masks.shape == (2, 1, MASK_LOW_RES_SIDE, MASK_LOW_RES_SIDE), family
        assert torch.isfinite(masks).all() and not torch.allclose(masks, other), family


def test_refusal_folders_load(tmp_path):
    text_lm = tiny_parts.save_tiny_text_lm(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(text_lm)
    assert model.config.model_type == "llama" and not hasattr(model.config, "vision_config")
    assert len(AutoTokenizer.from_pretrained(text_lm)) == model.config.vocab_size
    mask_model = AutoModel.from_pretrained(tiny_parts.save_tiny_non_sam_mask_model(tmp_path / "mask"))
    assert mask_model.config.model_type not in MASK_DECODER_FAMILIES
    assert not hasattr(mask_model, "mask_decoder") and not hasattr(mask_model, "prompt_encoder")
