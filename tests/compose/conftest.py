"""Composed GSVA pairs for the matrix tests: tiny Hub-like part folders written once per session, each VLM x
mask-decoder pair composed once, and two small random images of different sizes and aspect ratios."""

import contextlib
import copy
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel
from transformers.models.edgetam import modeling_edgetam
from transformers.utils import is_timm_available

from gsva_hf import tiny_parts

# Every VLM family with SAM and with SAM 2, SAM-HQ once (its mask step differs from SAM's only in the HQ path), and
# EdgeTAM once (SAM 2's mask step on a RepViT image backbone).
PAIRS = [(vlm, decoder) for vlm in tiny_parts.VLM_FAMILIES for decoder in ("sam", "sam2")] + [
    ("qwen2_5_vl", "sam_hq"),
    ("smolvlm", "edgetam"),
]


class StandInRepViT(torch.nn.Module):
    """Where timm cannot be imported, EdgeTAM's image backbone (timm's RepViT, `features_only`) is replaced by this:
    four strided conv stages with RepViT-M1's channels and strides (4, 8, 16, 32), returning timm's list of
    feature maps. Everything after the backbone (EdgeTAM's neck, prompt encoder and mask decoder) is EdgeTAM's own."""

    def __init__(self, channels):
        super().__init__()
        sides = [3, *channels]
        self.stages = torch.nn.ModuleList(
            torch.nn.Conv2d(sides[i], sides[i + 1], kernel_size=4 if i == 0 else 2, stride=4 if i == 0 else 2)
            for i in range(len(channels))
        )

    def forward(self, pixel_values, **kwargs):
        maps, hidden = [], pixel_values
        for stage in self.stages:
            hidden = torch.nn.functional.gelu(stage(hidden))
            maps.append(hidden)
        return SimpleNamespace(last_hidden_state=maps, hidden_states=None)


@contextlib.contextmanager
def edgetam_backbone():
    """EdgeTAM builds with its timm backbone where timm imports, else with `StandInRepViT` (inside this context)."""
    if is_timm_available():
        yield
        return

    class Auto:
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type != "timm_wrapper":
                return AutoModel.from_config(config, **kwargs)
            return StandInRepViT([48, 96, 192, 384])  # RepViT-M1's, as tiny_parts' EdgeTAM config names them

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_edgetam, "AutoModel", Auto)
        patch.setattr(tiny_parts, "is_timm_available", lambda: True)
        yield


# (height, width): one wide, one tall, neither square nor a multiple of any patch size.
IMAGE_SIZES = [(45, 83), (71, 38)]
QUESTIONS = ["Where is the cat?", "Find the dog and the bird please."]
# Target phrases per image: two and three slots, of different lengths, so batched target mode pads inside its
# later chunks too (not only before the first slot).
TARGETS = [["the red circle", "a cat"], ["man", "the small brown dog near the door", "a tree"]]


@dataclass
class ComposedPair:
    vlm: str
    decoder: str
    model: object
    processor: object
    slot_rows: torch.Tensor  # the LM head's `[SEG]`/`[REJ]` rows as composed, before `sharpen_slot_tokens`

    def plain_copy(self):
        """A copy of the model with the composed `[SEG]`/`[REJ]` rows: the sharpened ones make logits too large for
        a stable optimisation step."""
        model = copy.deepcopy(self.model)
        config = model.config
        with torch.no_grad():
            model.get_output_embeddings().weight[[config.seg_token_id, config.rej_token_id]] = self.slot_rows
        return model


def sharpen_slot_tokens(model, seed: int = 0, scale: float = 4.0) -> None:
    """Opposite large `[SEG]`/`[REJ]` rows of the LM head along one random direction: on a random model the
    full-vocabulary argmax is then one of the two at most slots, and which one varies with the state, so both
    decisions occur (a head tied to the input embeddings moves those two rows with it, on every path alike). The
    scale keeps the two-way scores off 0 and 1, where a wrong state would no longer show."""
    weight = model.get_output_embeddings().weight
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed))
    direction = scale * direction / direction.norm()
    with torch.no_grad():
        weight[model.config.seg_token_id] = direction
        weight[model.config.rej_token_id] = -direction


@pytest.fixture(scope="session")
def part_folder(tmp_path_factory):
    """`part_folder(family)`: a saved tiny VLM or mask-decoder folder of that family (or "text_lm", "non_sam"),
    written on first use."""
    root = tmp_path_factory.mktemp("parts")
    saved = {}

    def folder(family: str):
        if family not in saved:
            if family in tiny_parts.VLM_FAMILIES:
                saved[family] = tiny_parts.save_tiny_vlm(family, root / family)
            elif family == "text_lm":
                saved[family] = tiny_parts.save_tiny_text_lm(root / family)
            elif family == "non_sam":
                saved[family] = tiny_parts.save_tiny_non_sam_mask_model(root / family)
            else:
                with edgetam_backbone():
                    saved[family] = tiny_parts.save_tiny_mask_decoder(family, root / family)
        return saved[family]

    return folder


def compose_pair(part_folder, vlm: str, decoder: str, images) -> ComposedPair:
    """One composed pair, in eval mode, with its slot tokens sharpened along the first direction under which target
    mode decides both `[SEG]` and `[REJ]` for `TARGETS` and greedy generation for `QUESTIONS` holds a `[SEG]`, so the
    mask paths and both decisions are exercised."""
    from gsva_hf.compose import compose_gsva

    with edgetam_backbone():
        model, processor = compose_gsva(str(part_folder(vlm)), str(part_folder(decoder)))
    model.eval()
    config = model.config
    rows = model.get_output_embeddings().weight[[config.seg_token_id, config.rej_token_id]].detach().clone()
    targets, questions = processor(images=images, targets=TARGETS), processor(images=images, text=QUESTIONS)
    for seed in range(64):
        sharpen_slot_tokens(model, seed)
        decided = model.decide_targets(**targets).slot_is_seg
        flags = torch.cat([row[: len(phrases)] for row, phrases in zip(decided, TARGETS)])
        generated = model.generate(**questions, max_new_tokens=4, return_dict_in_generate=True, do_sample=False)
        if 0 < int(flags.sum()) < len(flags) and bool(generated.slot_is_seg.any()):
            return ComposedPair(vlm, decoder, model, processor, rows)
    raise AssertionError(f"{vlm}+{decoder}: no sharpening direction gave mixed target decisions and a generated [SEG]")


@pytest.fixture(scope="session", params=PAIRS, ids=[f"{vlm}+{decoder}" for vlm, decoder in PAIRS])
def composed_pair(request, part_folder, pair_images):
    return compose_pair(part_folder, *request.param, pair_images)


@pytest.fixture(scope="session")
def pair_images():
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
