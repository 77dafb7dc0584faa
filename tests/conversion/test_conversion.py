"""Checkpoint conversion (`gsva_hf.conversion`, `gsva_hf.convert_gsva_to_hf`) on tiny checkpoints written in the
original layouts: GSVA/LISA releases (PEFT prefixes, unmerged LoRA), LLaVA v1 + SAM `.pth` + CLIP, and
transformers Llava + SamModel folders.

The converted folders are loaded back with `from_pretrained` and compared with the same weights run
independently: a plain `LlamaForCausalLM` with LoRA merged by hand (logits), a hand-written `text_hidden_fcs`
(`[SEG]` embeddings) and segment-anything's own SAM (mask logits).
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SamConfig,
    SamModel,
)

from gsva_hf.conversion import (
    ConversionError,
    TensorStore,
    convert_bases,
    convert_release,
    convert_sam_state_dict,
)
from gsva_hf.convert_gsva_to_hf import main
from modeling_gsva import GSVAForCausalLM
from processing_gsva import GSVAProcessor
from tests._sam_reference import DECODER_HEADS, build_sam, hf_sam_config, reference_masks, segment_anything_modeling
from tests.conftest import exit_status

PEFT = "base_model.model."
WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z what are in this image please output sure".split()
WIDTH, LAYERS, HEADS, FFN = 32, 2, 4, 64
CLIP_WIDTH, CLIP_IMAGE, CLIP_PATCH = 16, 32, 16
LORA_R, LORA_ALPHA = 4, 16.0
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ builders
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights of a useful scale (transformers' 0.02 init makes every output nearly equal)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.dim() == 1 and "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.dim() <= 1:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise / math.sqrt(math.prod(tensor.shape[1:])))


def write_tokenizer(folder: Path, added: list[str]) -> PreTrainedTokenizerFast:
    """A word-level Llama-like tokenizer; `added` are LLaVA's own added tokens (7B v1 has <im_patch>, ...)."""
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )


def clip_config() -> CLIPConfig:
    return CLIPConfig(
        vision_config=dict(
            hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=CLIP_IMAGE, patch_size=CLIP_PATCH, hidden_act="quick_gelu",
        ),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=40,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=8,
    )


def write_llava_v1(folder: Path, added: list[str], clip_folder: Path, weights: dict | None) -> None:
    """An original-layout LLaVA v1 folder: Llama fields + mm_* in config.json, tokenizer, optional weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder, added)
    config = llama_config(len(tokenizer)).to_dict()
    config.update(
        model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(clip_folder),
        mm_hidden_size=CLIP_WIDTH, mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=True,
    )
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        torch.save(weights, folder / "pytorch_model.bin")


@dataclass
class Originals:
    """One set of original weights, in the original module layout, and the pieces to recompute outputs."""

    llama: dict  # LlamaForCausalLM keys (model.*, lm_head.weight), base weights without LoRA
    lora: dict  # "model.layers.0.self_attn.q_proj" -> (A, B)
    clip: dict  # CLIPVisionModel keys without the vision_model. prefix
    projector: dict
    fcs: dict  # text_hidden_fcs.0 keys ("0.weight", ...)
    sam: torch.nn.Module  # segment-anything Sam

    def merged_llama(self) -> dict:
        merged = dict(self.llama)
        for module, (a, b) in self.lora.items():
            merged[module + ".weight"] = merged[module + ".weight"] + (LORA_ALPHA / LORA_R) * b @ a
        return merged

    def release(self, base_layer_names: bool = False) -> dict:
        """The state dict GSVA's DeepSpeed `zero_to_fp32` writes for the PEFT-wrapped model."""
        state = {}
        for key, value in self.llama.items():
            module = key.rsplit(".", 1)[0]
            if module in self.lora:
                state[PEFT + (module + ".base_layer.weight" if base_layer_names else key)] = value
                state[PEFT + module + ".lora_A.default.weight"] = self.lora[module][0]
                state[PEFT + module + ".lora_B.default.weight"] = self.lora[module][1]
            else:
                state[PEFT + key] = value
        state.update({PEFT + "model.mm_projector." + k: v for k, v in self.projector.items()})
        state.update({PEFT + "model.vision_tower.vision_tower.vision_model." + k: v for k, v in self.clip.items()})
        state.update({PEFT + "model.visual_model." + k: v for k, v in self.sam.state_dict().items()})
        state.update({PEFT + "model.text_hidden_fcs.0." + k: v for k, v in self.fcs.items()})
        return state


def make_originals(vocab: int, clip_state: dict, sam, seed: int) -> Originals:
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config(vocab))
    randomize(llama, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    lora = {}
    for layer in range(LAYERS):
        for name in ("q_proj", "v_proj"):
            a = torch.randn(LORA_R, WIDTH, generator=generator) / math.sqrt(WIDTH)
            b = torch.randn(WIDTH, LORA_R, generator=generator) * 0.05
            lora[f"model.layers.{layer}.self_attn.{name}"] = (a, b)
    projector = {"weight": torch.randn(WIDTH, CLIP_WIDTH, generator=generator) / 4, "bias": 0.1 * torch.randn(WIDTH, generator=generator)}
    out = hf_sam_config()["prompt_encoder_config"]["hidden_size"]
    fcs = {
        "0.weight": torch.randn(WIDTH, WIDTH, generator=generator) / math.sqrt(WIDTH),
        "0.bias": 0.1 * torch.randn(WIDTH, generator=generator),
        "2.weight": torch.randn(out, WIDTH, generator=generator) / math.sqrt(WIDTH),
        "2.bias": 0.1 * torch.randn(out, generator=generator),
    }
    return Originals({k: v.clone() for k, v in llama.state_dict().items()}, lora, clip_state, projector, fcs, sam)


# ------------------------------------------------------------------------------------------------ world
@dataclass
class World:
    root: Path
    clip_folder: Path
    clip_state: dict
    base_7b: Path  # LLaVA v1 with <im_patch>/<im_start>/<im_end> (LLaVA-Lightning-7B-v1-1 style), with weights
    base_13b: Path  # LLaVA v1 with a plain 32000-style vocabulary, no weights
    n_7b: int
    n_13b: int
    sam: torch.nn.Module
    sam_pth: Path
    gsva: Originals  # trained on base_7b: vocabulary n_7b + [SEG] + [REJ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("conversion")
    clip_folder = root / "clip"
    clip_folder.mkdir()
    torch.manual_seed(0)
    clip = CLIPModel(clip_config())
    randomize(clip, 0)
    clip.config.save_pretrained(clip_folder)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_folder / "model.safetensors"))
    clip_state = {k[len("vision_model."):]: v.clone() for k, v in clip.state_dict().items() if k.startswith("vision_model.")}

    with segment_anything_modeling() as modeling:
        sam = build_sam(modeling, seed=0)
    sam_pth = root / "sam_vit_tiny.pth"
    torch.save(sam.state_dict(), sam_pth)

    added_7b = ["<im_patch>", "<im_start>", "<im_end>"]
    n_7b = 3 + len(WORDS) + len(added_7b)
    n_13b = 3 + len(WORDS)
    base_llama = make_originals(n_7b, clip_state, sam, seed=3)
    base_weights = {k: v for k, v in base_llama.llama.items()}
    base_weights.update({"model.mm_projector." + k: v for k, v in base_llama.projector.items()})
    base_weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    write_llava_v1(root / "llava-7b", added_7b, clip_folder, base_weights)
    write_llava_v1(root / "llava-13b", [], clip_folder, None)
    gsva = make_originals(n_7b + 2, clip_state, sam, seed=5)
    return World(root, clip_folder, clip_state, root / "llava-7b", root / "llava-13b", n_7b, n_13b, sam, sam_pth, gsva)


def write_release(world: World, state: dict, name: str) -> Path:
    path = world.root / name
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------------------------ reference
def reference_run(originals: Originals, config, input_ids, pixel_values, image_token_id, llama_state=None):
    """Logits and last hidden states of the original computation, written out by hand around plain modules."""
    vision = CLIPVisionModel(config.vision_config)
    vision.load_state_dict(originals.clip)
    state = llama_state if llama_state is not None else originals.merged_llama()
    llama = LlamaForCausalLM(llama_config(state["model.embed_tokens.weight"].shape[0]))
    llama.load_state_dict(state)
    with torch.no_grad():
        features = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = F.linear(features, originals.projector["weight"], originals.projector["bias"])
        embeds = llama.get_input_embeddings()(input_ids.masked_fill(input_ids == image_token_id, 0))
        embeds[input_ids == image_token_id] = features.reshape(-1, features.shape[-1])
        out = llama(inputs_embeds=embeds, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def reference_prompts(originals: Originals, hidden: torch.Tensor) -> torch.Tensor:
    fcs = originals.fcs
    return F.linear(F.relu(F.linear(hidden, fcs["0.weight"], fcs["0.bias"])), fcs["2.weight"], fcs["2.bias"])


def processor_batch(processor: GSVAProcessor, answer: str):
    generator = torch.Generator().manual_seed(7)
    image = (torch.rand(60, 80, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return processor(images=[image], text=["what are a b in this image"], answers=[answer])


def check_against_reference(folder: Path, originals: Originals, vocab_in_checkpoint: int, with_rej: bool = True):
    """The converted folder reproduces the original logits, [SEG] prompts and SAM mask logits."""
    model = GSVAForCausalLM.from_pretrained(folder).eval()
    processor = GSVAProcessor.from_pretrained(folder, trust_remote_code=False)
    processor.check_config(model.config)
    batch = processor_batch(processor, "sure a [SEG] b [REJ] c [SEG]" if with_rej else "sure a [SEG] b c [SEG]")
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        hidden = model.get_decoder()(inputs_embeds=model.embed_inputs(ids, batch["pixel_values"])).last_hidden_state
    ref_logits, ref_hidden = reference_run(originals, model.config, ids, batch["pixel_values"], model.config.image_token_id)
    torch.testing.assert_close(out.logits[..., :vocab_in_checkpoint], ref_logits[..., :vocab_in_checkpoint], **TOLERANCE)

    seg_positions = torch.nonzero(ids[0] == model.config.seg_token_id).flatten()
    assert len(seg_positions) == 2
    prompts = model.text_hidden_fcs[0](hidden[0, seg_positions - 1])
    ref = reference_prompts(originals, ref_hidden[0, seg_positions - 1])
    torch.testing.assert_close(prompts, ref, **TOLERANCE)

    resized = tuple(int(v) for v in batch["reshaped_input_sizes"][0])
    original = tuple(int(v) for v in batch["original_sizes"][0])
    _, _, _, ref_masks = reference_masks(originals.sam, batch["sam_pixel_values"], ref, resized, original)
    masks = processor.post_process_masks(out.pred_masks, batch["original_sizes"], batch["reshaped_input_sizes"], out.slot_mask)[0]
    if with_rej:
        assert out.slot_is_seg[0].tolist() == [True, False, True]
        assert torch.count_nonzero(masks[1]) == 0
        masks = masks[[0, 2]]
    torch.testing.assert_close(masks, ref_masks, **TOLERANCE)
    return model, processor


# ------------------------------------------------------------------------------------------------ releases
@pytest.mark.parametrize("base_layer_names", [False, True], ids=["peft0.4-names", "peft-base_layer-names"])
def test_gsva_release_reproduces_the_original_model(world, tmp_path, base_layer_names):
    release = write_release(world, world.gsva.release(base_layer_names), f"gsva-{base_layer_names}.bin")
    out = tmp_path / "out"
    code = main([
        "--release", str(release), "--llava", str(world.base_7b), "--lora-r", str(LORA_R),
        "--lora-alpha", str(LORA_ALPHA), "--output", str(out), "--max-shard-size", "100KB",
        "--sam-decoder-heads", str(DECODER_HEADS),
    ])
    assert code == 0
    model, processor = check_against_reference(out, world.gsva, world.n_7b + 2)
    ids = processor.token_ids
    assert (ids["seg_token_id"], ids["rej_token_id"]) == (world.n_7b, world.n_7b + 1)
    assert ids["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<im_patch>")
    assert model.config.text_config.vocab_size == world.n_7b + 2

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "processor_config.json", "README.md",
            "configuration_gsva.py", "modeling_gsva.py", "processing_gsva.py"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gsva.GSVAForCausalLM"
    readme = (out / "README.md").read_text()
    assert f"LoRA (r={LORA_R}, alpha={LORA_ALPHA})" in readme

    from huggingface_hub import ModelCard

    from gsva_hf.export import CODE_DIR, CODE_FILES

    card = ModelCard.load(out / "README.md")
    assert "gsva" in card.data.tags and not card.data.eval_results
    parameters = sum(p.numel() for p in model.parameters())
    assert f"parameters ({parameters:,}). Training: as released in {release.name} (GSVA, trained by its authors" in readme
    assert "Maximum length: 1024 tokens" in readme
    assert all((out / name).read_bytes() == (CODE_DIR / name).read_bytes() for name in CODE_FILES)


def test_lisa_release_gets_a_rej_row(world, tmp_path):
    """LISA on a 32000-token base: [SEG], <im_start>, <im_end> from the checkpoint; [REJ] and <image> are new rows."""
    n = world.n_13b
    lisa = make_originals(n + 3, world.clip_state, world.sam, seed=11)
    release = write_release(world, lisa.release(), "lisa.bin")
    report = convert_release(release, world.base_13b, tmp_path / "out", decoder_heads=DECODER_HEADS, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
    assert report.token_ids == {
        "seg_token_id": n, "rej_token_id": n + 3, "im_start_token_id": n + 1, "im_end_token_id": n + 2, "image_token_id": n + 4
    }
    assert report.added_rows == {"[REJ]": n + 3, "<image>": n + 4}
    model, _ = check_against_reference(tmp_path / "out", lisa, n + 3, with_rej=False)
    merged = lisa.merged_llama()
    for key, name in (("model.embed_tokens.weight", model.get_input_embeddings()), ("lm_head.weight", model.get_output_embeddings())):
        rows = name.weight.detach()
        assert rows.shape[0] == n + 5
        torch.testing.assert_close(rows[: n + 3], merged[key])
        torch.testing.assert_close(rows[n + 3], merged[key].mean(0))
        torch.testing.assert_close(rows[n + 4], merged[key].mean(0))


def test_release_kind_can_be_forced_and_wrong_base_vocab_fails(world, tmp_path):
    release = write_release(world, world.gsva.release(), "gsva-kind.bin")
    with pytest.raises(ConversionError) as error:
        convert_release(release, world.base_7b, tmp_path / "o1", decoder_heads=DECODER_HEADS, lora_r=LORA_R, release_kind="lisa")
    message = str(error.value)
    assert f"has {world.n_7b + 2} rows" in message
    assert f"a LISA release needs {world.n_7b + 1} rows ([SEG]={world.n_7b}" in message
    with pytest.raises(ConversionError) as error:
        convert_release(release, world.base_13b, tmp_path / "o2", decoder_heads=DECODER_HEADS, lora_r=LORA_R)
    message = str(error.value)
    assert f"{release}:base_model.model.model.embed_tokens.weight has {world.n_7b + 2} rows" in message
    assert f"the base tokenizer has {world.n_13b} tokens" in message
    assert f"a GSVA release needs {world.n_13b + 4} rows ([SEG]={world.n_13b}, [REJ]={world.n_13b + 1}" in message


# ------------------------------------------------------------------------------------------------ failures
def test_missing_tensor_is_named_and_can_be_allowed(world, tmp_path):
    state = world.gsva.release()
    gone = PEFT + "model.layers.1.mlp.down_proj.weight"
    del state[gone]
    del state[PEFT + "model.visual_model.mask_decoder.iou_token.weight"]
    release = write_release(world, state, "gsva-missing.bin")
    with pytest.raises(ConversionError) as error:
        convert_release(release, world.base_7b, tmp_path / "o1", decoder_heads=DECODER_HEADS, lora_r=LORA_R)
    message = str(error.value)
    assert "2 tensors of the GSVA model are missing" in message
    assert f"model.language_model.layers.1.mlp.down_proj.weight [{WIDTH}, {FFN}]" in message
    assert "model.sam.mask_decoder.iou_token.weight [1, 16]" in message

    report = convert_release(
        release, world.base_7b, tmp_path / "o2", decoder_heads=DECODER_HEADS, lora_r=LORA_R,
        allow_missing=["language_model.model.layers.1.mlp.*", "sam.mask_decoder.iou_token.*"],
    )
    model = GSVAForCausalLM.from_pretrained(tmp_path / "o2")
    base = torch.load(world.base_7b / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(model.language_model.layers[1].mlp.down_proj.weight, base["model.layers.1.mlp.down_proj.weight"])
    assert report.filled == [f"model.language_model.layers.1.mlp.down_proj.weight <- {world.base_7b}:model.layers.1.mlp.down_proj.weight"]
    assert report.fresh == ["model.sam.mask_decoder.iou_token.weight"]
    assert torch.isfinite(model.sam.mask_decoder.iou_token.weight).all()


def test_merged_export_without_vision_tower_takes_clip_from_its_folder(world, tmp_path):
    """LISA-style merged export: no PEFT prefix, LoRA merged, CLIP dropped; CLIP comes from mm_vision_tower."""
    originals = world.gsva
    state = dict(originals.merged_llama())
    state.update({"model.mm_projector." + k: v for k, v in originals.projector.items()})
    state.update({"model.visual_model." + k: v for k, v in originals.sam.state_dict().items()})
    state.update({"model.text_hidden_fcs.0." + k: v for k, v in originals.fcs.items()})
    release = write_release(world, state, "gsva-merged-export.bin")
    with pytest.raises(ConversionError, match=r"vision_tower.embeddings.class_embedding \[16\]"):
        convert_release(release, world.base_7b, tmp_path / "o1", decoder_heads=DECODER_HEADS)
    report = convert_release(release, world.base_7b, tmp_path / "o2", decoder_heads=DECODER_HEADS, allow_missing=["vision_tower.*"])
    assert len(report.filled) == len(originals.clip) and not report.fresh
    assert all(str(world.clip_folder) in line for line in report.filled)
    check_against_reference(tmp_path / "o2", originals, world.n_7b + 2)


def test_extra_tensors_are_named_and_can_be_allowed(world, tmp_path):
    state = world.gsva.release()
    state[PEFT + "model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state[PEFT + "model.vision_tower.unknown.weight"] = torch.zeros(3)
    release = write_release(world, state, "gsva-extra.bin")
    with pytest.raises(ConversionError) as error:
        convert_release(release, world.base_7b, tmp_path / "o1", decoder_heads=DECODER_HEADS, lora_r=LORA_R)
    message = str(error.value)
    assert "2 checkpoint tensors map to nothing" in message
    assert (
        f"{release}:{PEFT}model.layers.0.self_attn.extra.weight "
        "(would be model.language_model.layers.0.self_attn.extra.weight, which the GSVA model does not have)"
    ) in message
    assert f"{release}:{PEFT}model.vision_tower.unknown.weight" in message
    report = convert_release(release, world.base_7b, tmp_path / "o2", decoder_heads=DECODER_HEADS, lora_r=LORA_R, allow_unexpected=["*extra*", "*unknown*"])
    assert len([d for d in report.dropped if "allowed unexpected" in d]) == 2


def test_shape_mismatch_is_named(world, tmp_path):
    state = world.gsva.release()
    state[PEFT + "model.mm_projector.weight"] = torch.zeros(WIDTH, CLIP_WIDTH + 1)
    release = write_release(world, state, "gsva-shape.bin")
    with pytest.raises(ConversionError, match=r"multi_modal_projector.linear_1.weight: .*mm_projector.weight has \[32, 17\], the model expects \[32, 16\]"):
        convert_release(release, world.base_7b, tmp_path / "o", decoder_heads=DECODER_HEADS, lora_r=LORA_R)


def test_lora_rank_is_cross_checked(world, tmp_path):
    release = write_release(world, world.gsva.release(), "gsva-rank.bin")
    with pytest.raises(ConversionError) as error:
        convert_release(release, world.base_7b, tmp_path / "o1", decoder_heads=DECODER_HEADS, lora_r=8)
    message = str(error.value)
    assert f"--lora-r is 8 but these LoRA tensors have rank [{LORA_R}]" in message
    assert "expected lora_A of shape [8, in_features]" in message
    assert f"{PEFT}model.layers.0.self_attn.q_proj.lora_A.default.weight [{LORA_R}, {WIDTH}]" in message
    with pytest.raises(ConversionError, match=rf"unmerged LoRA tensors of rank \[{LORA_R}\].*pass --lora-r"):
        convert_release(release, world.base_7b, tmp_path / "o2")

    merged = {PEFT + k: v for k, v in world.gsva.release().items() if "lora_" not in k}
    merged_release = write_release(world, merged, "gsva-merged.bin")
    with pytest.raises(ConversionError, match="holds no LoRA tensors"):
        convert_release(merged_release, world.base_7b, tmp_path / "o3", decoder_heads=DECODER_HEADS, lora_r=LORA_R)

    state = world.gsva.release()
    state[PEFT + "model.layers.1.self_attn.v_proj.lora_A.default.weight"] = torch.zeros(2, WIDTH)
    broken = write_release(world, state, "gsva-broken-lora.bin")
    with pytest.raises(ConversionError, match=r"layers.1.self_attn.v_proj.lora_A.default.weight \[2, 32\] / .*lora_B.default.weight \[32, 4\] do not fit"):
        convert_release(broken, world.base_7b, tmp_path / "o4", decoder_heads=DECODER_HEADS, lora_r=LORA_R)


def test_vocabulary_that_does_not_match_the_tokenizer_fails(world, tmp_path):
    state = world.gsva.release()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[PEFT + key] = torch.cat([state[PEFT + key], torch.zeros(1, WIDTH)])
    release = write_release(world, state, "gsva-vocab.bin")
    with pytest.raises(ConversionError) as error:
        convert_release(release, world.base_7b, tmp_path / "o1", decoder_heads=DECODER_HEADS, lora_r=LORA_R)
    message = str(error.value)
    assert f"{PEFT}model.embed_tokens.weight has {world.n_7b + 3} rows" in message
    assert f"base tokenizer has {world.n_7b} tokens" in message
    assert f"a GSVA release needs {world.n_7b + 2} rows ([SEG]={world.n_7b}, [REJ]={world.n_7b + 1}" in message

    state = world.gsva.release()
    state[PEFT + "lm_head.weight"] = state[PEFT + "lm_head.weight"][:-1]
    release = write_release(world, state, "gsva-head.bin")
    with pytest.raises(ConversionError, match=rf"embed_tokens.weight has {world.n_7b + 2} rows but .*lm_head.weight has {world.n_7b + 1}"):
        convert_release(release, world.base_7b, tmp_path / "o2", decoder_heads=DECODER_HEADS, lora_r=LORA_R)


def test_sam_variant_is_cross_checked(world, tmp_path):
    release = write_release(world, world.gsva.release(), "gsva-sam.bin")
    with pytest.raises(ConversionError, match="SAM image encoder has width 32 and 3 blocks, but --sam vit_h has width 1280 and 32 blocks"):
        convert_release(release, world.base_7b, tmp_path / "o", decoder_heads=DECODER_HEADS, lora_r=LORA_R, sam="vit_h")


def test_cli_reports_errors_with_exit_code(world, tmp_path, capsys):
    release = write_release(world, world.gsva.release(), "gsva-cli.bin")
    code = exit_status(main, ["--release", str(release), "--llava", str(world.base_7b), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "pass --lora-r" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bases
def test_llava_v1_and_sam_pth_bases(world, tmp_path):
    out = tmp_path / "out"
    report = convert_bases(world.base_7b, world.sam_pth, out, decoder_heads=DECODER_HEADS)
    assert any("rotary_emb.inv_freq" in d for d in report.dropped)
    assert any("text_model" in d for d in report.dropped)
    assert sorted(report.fresh) == sorted(f"model.text_hidden_fcs.0.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    n = world.n_7b
    assert report.added_rows == {"[SEG]": n, "[REJ]": n + 1}

    base = torch.load(world.base_7b / "pytorch_model.bin", weights_only=True)
    llama_state = {k: v for k, v in base.items() if not k.startswith("model.mm_projector") and "rotary" not in k}
    model = GSVAForCausalLM.from_pretrained(out).eval()
    processor = GSVAProcessor.from_pretrained(out, trust_remote_code=False)
    batch = processor_batch(processor, "sure a b")
    originals = Originals(llama_state, {}, world.clip_state, {k[len("model.mm_projector."):]: v for k, v in base.items() if k.startswith("model.mm_projector")}, {}, world.sam)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    ref, _ = reference_run(originals, model.config, batch["input_ids"], batch["pixel_values"], model.config.image_token_id, llama_state)
    torch.testing.assert_close(logits[..., :n], ref, **TOLERANCE)
    for embedding, key in ((model.get_input_embeddings(), "model.embed_tokens.weight"), (model.get_output_embeddings(), "lm_head.weight")):
        torch.testing.assert_close(embedding.weight[n:].detach(), base[key].mean(0).expand(2, -1))

    sam_state = convert_sam_state_dict(world.sam.state_dict(), model.sam)
    for key, value in model.sam.state_dict().items():
        torch.testing.assert_close(value, sam_state[key])
    first = model.text_hidden_fcs[0][0].weight
    bound = 1 / math.sqrt(WIDTH)
    assert first.abs().max() <= bound and first.std() > bound / 4


def test_transformers_llava_and_sam_folders(world, tmp_path):
    """LLaVA-1.5 style: transformers Llava folder (mlp2x_gelu, <image> token, vocabulary padded past the tokenizer)."""
    folder = tmp_path / "llava-hf"
    folder.mkdir()
    tokenizer = write_tokenizer(folder, ["<image>", "<pad>"])
    n = len(tokenizer)
    config = LlavaConfig(
        vision_config=clip_config().vision_config.to_dict(), text_config=llama_config(64).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    randomize(llava, 1)
    llava.save_pretrained(folder)
    sam_folder = tmp_path / "sam-hf"
    torch.manual_seed(0)
    sam = SamModel(SamConfig(**hf_sam_config()))
    randomize(sam, 2)
    sam.save_pretrained(sam_folder)

    report = convert_bases(folder, sam_folder, tmp_path / "out", dtype=torch.bfloat16)
    assert report.token_ids["image_token_id"] == n - 2
    assert report.added_rows == {"[SEG]": n, "[REJ]": n + 1, "<im_start>": n + 2, "<im_end>": n + 3}
    model = GSVAForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert model.config.projector_type == "mlp2x_gelu"
    assert model.lm_head.weight.dtype == torch.float32
    assert model.config.text_config.vocab_size == 64

    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = llava(input_ids=ids).logits
    torch.testing.assert_close(ours[..., :n], theirs[..., :n], atol=0.05, rtol=0.05)
    ours_state, theirs_state = model.state_dict(), llava.state_dict()
    for key in ("multi_modal_projector.linear_2.weight", "vision_tower.encoder.layers.1.mlp.fc1.weight"):
        torch.testing.assert_close(ours_state["model." + key], theirs_state["model." + key].to(torch.bfloat16).float())
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(ours_state["model.sam." + key], value.to(torch.bfloat16).float())
    mean = theirs_state["lm_head.weight"][:n].float().mean(0).to(torch.bfloat16).float()
    torch.testing.assert_close(model.lm_head.weight[n + 1].detach(), mean)


def test_base_vocabulary_mismatch_fails(world, tmp_path):
    folder = tmp_path / "llava-bad"
    base = torch.load(world.base_7b / "pytorch_model.bin", weights_only=True)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        base[key] = torch.cat([base[key], torch.zeros(2, WIDTH)])
    write_llava_v1(folder, ["<im_patch>", "<im_start>", "<im_end>"], world.clip_folder, base)
    with pytest.raises(ConversionError, match=rf"embed_tokens.weight has {world.n_7b + 2} rows but the tokenizer of .* has {world.n_7b} tokens"):
        convert_bases(folder, world.sam_pth, tmp_path / "out", decoder_heads=DECODER_HEADS)


# ------------------------------------------------------------------------------------------------ random, stores
def test_random_tiny_preset(tmp_path):
    assert main(["--random", "--preset", "tiny", "--output", str(tmp_path / "tiny")]) == 0
    model = GSVAForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    processor = GSVAProcessor.from_pretrained(tmp_path / "tiny", trust_remote_code=False)
    processor.check_config(model.config)
    batch = processor_batch(processor, "sure a [SEG]")
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    masks = processor.post_process_masks(out.pred_masks, batch["original_sizes"], batch["reshaped_input_sizes"])
    assert masks[0].shape == (1, 60, 80)
    assert exit_status(main, ["--random", "--preset", "tiny", "--output", str(tmp_path / "tiny")]) == 2


def test_tensor_store_reads_lazily_and_releases(tmp_path):
    torch.save({"a": torch.ones(3), "b": torch.zeros(2, 2)}, tmp_path / "x.bin")
    store = TensorStore.open(tmp_path / "x.bin")
    assert store.shape("b") == (2, 2)
    assert torch.equal(store.get("a"), torch.ones(3))
    store.release("a")
    with pytest.raises(RuntimeError, match="already released"):
        store.get("a")
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "wrapped.pt")
    assert TensorStore.open(tmp_path / "wrapped.pt").keys() == ["w"]
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"step \(int\)"):
        TensorStore.open(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------------ SentencePiece bases
def write_sentencepiece_llava_v1(folder: Path, clip_folder: Path) -> int:
    """A LLaVA v1.1-style base that ships only a slow SentencePiece `tokenizer.model` (no tokenizer.json)."""
    import io

    import sentencepiece

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=60, model_type="bpe", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    settings = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "model_max_length": 2048, "legacy": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    config = llama_config(60).to_dict()
    config.update(
        model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(clip_folder),
        mm_hidden_size=CLIP_WIDTH, mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=True,
    )
    (folder / "config.json").write_text(json.dumps(config))
    return 60


@pytest.fixture(scope="module")
def sentencepiece_base(world) -> tuple[Path, int]:
    folder = world.root / "llava-v1-sentencepiece"
    return folder, write_sentencepiece_llava_v1(folder, world.clip_folder)


def test_release_on_a_sentencepiece_only_base_converts_with_gsva_length(world, sentencepiece_base, tmp_path):
    import sentencepiece

    base, n = sentencepiece_base
    assert not (base / "tokenizer.json").exists()
    originals = make_originals(n + 4, world.clip_state, world.sam, seed=13)
    release = write_release(world, originals.release(), "gsva-sentencepiece.bin")
    out = tmp_path / "out"
    code = main([
        "--release", str(release), "--llava", str(base), "--lora-r", str(LORA_R), "--output", str(out),
        "--sam-decoder-heads", str(DECODER_HEADS),
    ])  # fmt: skip
    assert code == 0
    _, processor = check_against_reference(out, originals, n + 4)
    assert processor.token_ids["seg_token_id"] == n and processor.token_ids["rej_token_id"] == n + 1
    reader = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    sentence = "what are a b in this image please"
    assert processor.tokenizer.tokenize(sentence) == reader.encode(sentence, out_type=str)

    # GSVA's 1024, not the base's 2048; past it the processor raises naming the limit instead of truncating.
    reloaded = GSVAProcessor.from_pretrained(out)
    assert reloaded.tokenizer.model_max_length == 1024
    image = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    def length(repeats):
        return reloaded(images=[image], text=[" ".join(["a b c"] * repeats)])["input_ids"].shape[1]

    per_repeat = (length(20) - length(10)) // 10
    fits = 10 + (1024 - length(10)) // per_repeat
    assert length(fits) <= 1024 < length(fits) + per_repeat
    with pytest.raises(ValueError, match=r"conversation 0 is \d+ tokens long .* more than the limit of 1024"):
        length(fits + 1)


def test_missing_sentencepiece_reader_names_the_packages(world, sentencepiece_base, tmp_path, monkeypatch):
    """Without sentencepiece transformers blames tiktoken; the converter says what to install instead."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` fails as if not installed
    release = write_release(world, world.gsva.release(), "gsva-no-reader.bin")
    with pytest.raises(ConversionError) as error:
        convert_release(release, sentencepiece_base[0], tmp_path / "o", lora_r=LORA_R, decoder_heads=DECODER_HEADS)
    message = str(error.value)
    assert f"LLaVA base {sentencepiece_base[0]}: cannot load its tokenizer" in message
    assert "sentencepiece is not installed: pip install sentencepiece" in message


# ------------------------------------------------------------------------------------------------ broken files
def convert_cli(world, release: Path, out: Path, capsys) -> str:
    """Run the command line on a release; it must fail with one message and no traceback."""
    code = exit_status(main, [
        "--release", str(release), "--llava", str(world.base_7b), "--lora-r", str(LORA_R), "--output", str(out),
        "--sam-decoder-heads", str(DECODER_HEADS),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("gsva-convert-to-hf: error: "), err
    return err


def test_unreadable_checkpoint_files_are_named(world, tmp_path, capsys):
    good = write_release(world, world.gsva.release(), "gsva-good.bin")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    text = tmp_path / "notes.bin"
    text.write_text("these are my notes, not weights\n")
    header = tmp_path / "bad.safetensors"
    header.write_bytes((40).to_bytes(8, "little") + b"{this is not a safetensors header}      ")
    cases = [
        (truncated, "truncated or corrupt"),
        (empty, "the file is empty (0 bytes)"),
        (text, "not a PyTorch checkpoint"),
        (header, "not a valid safetensors file"),
    ]
    for path, what in cases:
        err = convert_cli(world, path, tmp_path / f"out-{path.stem}", capsys)
        assert f"{path}: " in err and what in err, err
        assert "expected a torch.save file (.bin/.pt/.pth) or a .safetensors file" in err or "safetensors" in err, err


def test_wrong_dtype_and_impossible_shapes_are_named(world, tmp_path, capsys):
    state = world.gsva.release()
    key = PEFT + "model.layers.0.mlp.up_proj.weight"
    state[key] = state[key].to(torch.int64)
    release = write_release(world, state, "gsva-int.bin")
    err = convert_cli(world, release, tmp_path / "o1", capsys)
    assert f"{release}:{key} holds int64" in err and "a floating-point tensor" in err
    assert "model.language_model.layers.0.mlp.up_proj.weight" in err

    state = world.gsva.release()
    iou = PEFT + "model.visual_model.mask_decoder.iou_token.weight"
    state[iou] = torch.zeros(1, 15)
    release = write_release(world, state, "gsva-iou.bin")
    err = convert_cli(world, release, tmp_path / "o2", capsys)
    assert "mask_decoder.iou_token.weight has shape [1, 15]" in err
    assert f"{release} (model.visual_model.*): SAM tensor" in err and "expected [1, 16] (the width of prompt_encoder.no_mask_embed.weight" in err


def test_non_finite_weights_are_named(world, tmp_path, capsys):
    state = world.gsva.release()
    nan_key, inf_key = PEFT + "model.norm.weight", PEFT + "model.text_hidden_fcs.0.2.bias"
    state[nan_key] = state[nan_key].clone()
    state[nan_key][3] = float("nan")
    state[inf_key] = state[inf_key].clone()
    state[inf_key][:2] = float("inf")
    release = write_release(world, state, "gsva-nan.bin")
    err = convert_cli(world, release, tmp_path / "o", capsys)
    assert "2 tensors hold NaN or infinite values" in err
    assert f"model.language_model.norm.weight ({release}:{nan_key}): 1 NaN, 0 inf of {WIDTH}" in err
    assert f"model.text_hidden_fcs.0.2.bias ({release}:{inf_key}): 0 NaN, 2 inf" in err
    assert "--allow-non-finite" in err
    report = convert_release(release, world.base_7b, tmp_path / "o2", lora_r=LORA_R, decoder_heads=DECODER_HEADS, allow_non_finite=True)
    assert any("NaN or infinite" in note for note in report.notes)


# ------------------------------------------------------------------------------------------------ token specialness
def test_ordinary_seg_rej_tokens_of_the_base_become_special(world, tmp_path):
    """GSVA's saved tokenizer holds [SEG]/[REJ] as ordinary added tokens; converted, typed text never becomes them."""
    base = tmp_path / "llava-with-gsva-tokens"
    write_llava_v1(base, ["<im_patch>", "<im_start>", "<im_end>"], world.clip_folder, None)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    tokenizer.add_tokens(["[SEG]", "[REJ]"])
    tokenizer.save_pretrained(base)
    assert tokenizer.encode("the [SEG] a", add_special_tokens=False, split_special_tokens=True)[1] == world.n_7b

    release = write_release(world, world.gsva.release(), "gsva-ordinary-tokens.bin")
    report = convert_release(release, base, tmp_path / "out", lora_r=LORA_R, decoder_heads=DECODER_HEADS)
    assert (report.token_ids["seg_token_id"], report.token_ids["rej_token_id"]) == (world.n_7b, world.n_7b + 1)
    assert not report.added_rows
    _, processor = check_against_reference(tmp_path / "out", world.gsva, world.n_7b + 2)
    image = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    batch = processor(images=[image], text=["what are a [SEG] b [REJ] in this image"], answers=["sure a [SEG] b [REJ]"])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    for token_id in (world.n_7b, world.n_7b + 1):
        assert (ids == token_id).sum() == 1 and (labels == token_id).sum() == 1  # the answer's, not the question's


def test_processor_refuses_ordinary_gsva_tokens_and_says_how_to_fix(tmp_path):
    from gsva_hf.presets import image_processors

    tokenizer = write_tokenizer(tmp_path, [])
    tokenizer.add_tokens(["[SEG]", "[REJ]"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<im_start>", "<im_end>", "<image>"]})
    tokenizer.pad_token = "<unk>"
    clip, sam = image_processors(CLIP_IMAGE, 64)
    with pytest.raises(ValueError, match=r"holds '\[SEG\]' \(id \d+\) as an ordinary added token, .*add_gsva_tokens"):
        GSVAProcessor(clip, sam, tokenizer, image_token="<image>")
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    ids = GSVAProcessor.add_gsva_tokens(tokenizer, "<image>")
    assert ids["[SEG]"] == seg
    processor = GSVAProcessor(clip, sam, tokenizer, image_token="<image>")
    batch = processor(images=[torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()], text=["the [SEG] thing"])
    assert seg not in batch["input_ids"][0].tolist()
