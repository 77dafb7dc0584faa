"""GSVAProcessor: tokenizer + CLIP image processor + SAM image processor, and GSVA's prompt templates.

The prompt text a model user needs is defined here, once: GSVA's two conversation formats as chat templates, target
mode's question and answer. Training's prompt augmentation lists are in the training package (gsva_hf/data).
Shipped with a Hub repository for ``trust_remote_code``: imports only torch, transformers and its sibling files.
"""

import json
import re
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

try:
    from .configuration_gsva import GSVAConfig
except ImportError:
    from configuration_gsva import GSVAConfig

SEG_TOKEN = "[SEG]"
REJ_TOKEN = "[REJ]"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
DEFAULT_IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------
# Prompt text a model user needs (GSVA `utils/utils.py`, verbatim); training augmentation lists are in the
# training package (`gsva_hf/data/prompts.py`). Questions are stored without GSVA's leading "<image>\n": the chat
# template puts the image first, followed by "\n".
# --------------------------------------------------------------------------------------------------------------
# GSVA's multi-target question (`SHORT_QUESTION_LIST_MODE4[3]`), asked by `targets_question` for free generation.
TARGETS_QUESTION = "What are {class_name} in this image? Please output segmentation masks."
# (start, per-target template, end) of GSVA's multi-target answers (ANSWER_LIST_MODE4_*): what the model writes,
# read back by `answer_phrases`; the data readers build training answers from them.
MULTI_TARGET_ANSWER_STYLES = [
    ("The segmentation results are", "{class_name} [SEG]", "."),
    ("Sure, they are", "{class_name}:[SEG]", "."),
    ("Sure,", "the mask of {class_name} is [SEG]", "."),
    ("Sure,", "the segmentation of {class_name} is [SEG]", "."),
    ("Sure,", "the referred {class_name} is [SEG]", "."),
]


def eval_question(sentences: list[str]) -> str:
    """GSVA's validation question for all sentences of an image, quirks kept (no space before "in")."""
    return " What are " + ", ".join(sentences) + "in this image? Please output segmentation masks."


def eval_answer(sentences: list[str], rejected: list[bool]) -> str:
    """GSVA's validation answer (`Sure,` with no space), one `[SEG]`/`[REJ]` per sentence."""
    if len(sentences) != len(rejected):
        raise ValueError(f"got {len(sentences)} sentences but {len(rejected)} rejected flags")
    parts = [("Sure,", False)]
    for index, (sentence, is_rejected) in enumerate(zip(sentences, rejected)):
        parts += [(", " if index else "", False), (sentence, True), (":" + (REJ_TOKEN if is_rejected else SEG_TOKEN), False)]
    return AnswerText.join(parts + [(".", False)])


class AnswerText(str):
    """An answer string that knows which of its characters are typed text (a dataset's sentence or class name, an
    explanation, a VQA answer): a `[SEG]`/`[REJ]` inside `literal` spans is encoded as plain text, never as the
    slot token, so only the template's own slots become tokens. Equal to, and printed as, the plain string; a
    plain `str` answer (or one changed by string operations) has no typed spans."""

    literal: tuple[tuple[int, int], ...] = ()

    @classmethod
    def join(cls, parts) -> "AnswerText":
        """Concatenate `(text, typed)` pairs, marking the typed ones."""
        text, spans = "", []
        for part, typed in parts:
            if typed and part:
                spans.append((len(text), len(text) + len(part)))
            text += part
        answer = cls(text)
        answer.literal = tuple(spans)
        return answer


def clean_sentence(sentence: str) -> str:
    """GSVA's sentence normalisation for evaluation: strip, lower-case, then drop full stops at either end (a "."
    inside the sentence stays)."""
    return sentence.strip().lower().strip(".")


# --------------------------------------------------------------------------------------------------------------
# Chat templates: GSVA's two conversation formats (`model/llava/conversation.py`: `conv_llava_v1`, the Vicuna
# "two" style, and `conv_llava_llama_2`), the one definition of the prompt text. `gsva_chat_template` prefixes a
# body with the system prompt and this processor's image markup, so a saved `chat_template.jinja` stands alone.
# --------------------------------------------------------------------------------------------------------------
SYSTEM_PROMPTS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "llava_llama_2": "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
}
# A message's content (a string, or items {"type": "image"} / {"type": "text", "text": ...}) placed verbatim; a
# leading system message replaces the default system prompt. The assistant's answer and end-of-turn token are in
# `{% generation %}`: the tokens trained on.
_CONTENT_MACRO = r"""{%- macro content_text(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for item in content -%}
{%- if item['type'] == 'image' -%}{{- image -}}{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = content_text(messages[0]['content']) -%}{%- set messages = messages[1:] -%}
{%- endif -%}
"""
CHAT_TEMPLATE_BODIES = {
    # SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>
    "llava_v1": r"""{{- system + ' ' -}}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}{{- 'USER: ' + content_text(message['content']) -}}
{%- elif message['role'] == 'assistant' -%}{{- ' ASSISTANT: ' -}}
{%- generation -%}{{- content_text(message['content']) -}}{{- eos_token -}}{%- endgeneration -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}
""",
    # [INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\n<image>\nQ [/INST] A </s><s>[INST] Q2 [/INST] A2 </s>
    "llava_llama_2": r"""{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{%- if loop.first -%}{{- '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' -}}
{%- else -%}{{- bos_token -}}{{- '[INST] ' -}}{%- endif -%}
{{- content_text(message['content']) + ' [/INST]' -}}
{%- elif message['role'] == 'assistant' -%}{{- ' ' -}}
{%- generation -%}{{- content_text(message['content']) + ' ' -}}{{- eos_token -}}{%- endgeneration -%}
{%- endif -%}
{%- endfor -%}
""",
}


def gsva_chat_template(conv_template: str, image_token: str = DEFAULT_IMAGE_TOKEN, use_im_start_end: bool = True):
    """The Jinja chat template of a GSVA conversation format, with its system prompt and this processor's image
    markup (`<im_start><image><im_end>` or the image token alone, then a line break) written in."""
    if conv_template not in CHAT_TEMPLATE_BODIES:
        raise ValueError(f"conv_template must be one of {sorted(CHAT_TEMPLATE_BODIES)}, got {conv_template!r}")
    image = (IM_START_TOKEN + image_token + IM_END_TOKEN if use_im_start_end else image_token) + "\n"
    header = "{%- set system = " + json.dumps(SYSTEM_PROMPTS[conv_template]) + " -%}\n"
    header += "{%- set image = " + json.dumps(image) + " -%}\n"
    return header + _CONTENT_MACRO + CHAT_TEMPLATE_BODIES[conv_template]


@dataclass
class SegmentedTarget:
    """One asked or generated target.

    mask: bool `[H, W]` at the original image size (all False when rejected).
    score: probability of the model's choice (`[SEG]` or `[REJ]`) between the two tokens at this slot.
    mask_score: mean foreground probability inside the mask (0 when rejected or empty).
    rle: COCO RLE of the mask (uncompressed counts, column-major) when asked for.
    """

    phrase: str
    rejected: bool
    mask: torch.Tensor
    score: float
    mask_score: float
    rle: dict | None = None


@dataclass
class SegmentationResult:
    """Per image: the answer, one entry per `[SEG]`/`[REJ]` slot, and anything that could not be matched."""

    answer: str
    targets: list[SegmentedTarget]
    warnings: list[str]


def mask_to_rle(mask: torch.Tensor) -> dict:
    """COCO RLE (uncompressed: `counts` is a list, column-major, starting with a run of zeros)."""
    flat = mask.detach().cpu().bool().t().reshape(-1)
    changes = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    edges = torch.cat([torch.tensor([0]), changes, torch.tensor([flat.numel()])])
    counts = (edges[1:] - edges[:-1]).tolist()
    if flat.numel() and bool(flat[0]):
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------
# Size limits of `load_image`. Memory grows ~40 bytes per pixel through the processors and full-size masks (a
# 12000x12000 image took 5.4 GB), so larger images are refused rather than swapped through. SAM resizes the long side
# to `longest_edge` and rounds the short side: it becomes 0 (a processor crash) beyond 2 * longest_edge : 1, which
# is 2048:1 for SAM's 1024; the processor checks its own SAM's limit (256:1 for the 128-pixel tiny model).
MAX_IMAGE_MEGAPIXELS = 40
MAX_ASPECT_RATIO = 2048


# What Pillow raises on a corrupt file or metadata block (a bad EXIF block gives SyntaxError or struct.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError, struct.error)


def load_image(image, name: str | None = None, exif_transpose: bool = True) -> Image.Image:
    """Open a path / binary file / PIL image / HxW(x1|3|4) array as an upright 8-bit RGB PIL image, or raise
    ValueError naming the input (any decoding error, the EXIF block's included).

    Grey levels follow the bit depth (`_to_uint8`); images over `MAX_IMAGE_MEGAPIXELS` or more elongated than
    `MAX_ASPECT_RATIO` are refused with their size. `name` labels errors for in-memory images (e.g. an upload).
    exif_transpose=False keeps the pixels as stored (dataset images, whose annotations are on them).
    """
    if isinstance(image, (str,)) or hasattr(image, "__fspath__") or hasattr(image, "read"):
        name = name or str(image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(image)
        except Image.DecompressionBombError as error:
            raise ValueError(f"image {name!r} is too large ({error}); the limit is {MAX_IMAGE_MEGAPIXELS} megapixels") from error
        except _DECODE_ERRORS as error:
            raise ValueError(f"cannot open image file {name!r}: {error}") from error
        with opened:
            _check_size(opened.size, name)
            try:
                opened.load()
            except _DECODE_ERRORS as error:
                raise ValueError(f"cannot read image file {name!r}: {error}") from error
            image = opened.copy()
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
        _check_size((array.shape[1], array.shape[0]), name or "array")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        image = Image.fromarray(_to_uint8(array))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"images must be file paths, PIL images or numpy arrays, got {type(image).__name__}")
    if exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except _DECODE_ERRORS as error:
            raise ValueError(f"cannot read the EXIF block of image {name or 'image'!r}: {error}") from error
    _check_size(image.size, name or "image")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    return image.convert("RGB")


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image {name!r} has no pixels (size {width}x{height})")
    if width * height > MAX_IMAGE_MEGAPIXELS * 1_000_000:
        raise ValueError(
            f"image {name!r} is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{MAX_IMAGE_MEGAPIXELS} megapixels; downscale it first"
        )
    _check_aspect_ratio(size, f"image {name!r}", "the limit", MAX_ASPECT_RATIO, "SAM's resize would leave its short side 0 pixels")


def _check_aspect_ratio(size: tuple[int, int], what: str, whose: str, limit: int, why: str) -> None:
    """The one aspect-ratio rule: refuse an image whose long side exceeds `limit` times its short side."""
    width, height = size
    if max(width, height) > limit * min(width, height):
        raise ValueError(
            f"{what} is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
            f"beyond {whose} of {limit}:1 ({why}); crop it first"
        )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """0..255 grey levels by bit depth: uint8 as is; uint16 (16-bit PNG/TIFF) / 65535; wider integers (Pillow's
    mode "I", which also holds 16-bit PGM) by value range: max <= 255 as is, <= 65535 / 65535, else / the type's
    maximum; negatives clip to 0; bool x 255; floats as 0..1 when max <= 1, else 0..255 clipped."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        high = 1.0 if array.size and float(array.max()) <= 1.0 else 255.0
        return np.clip(array / high * 255.0, 0, 255).round().astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"image arrays must hold integers, floats or booleans, got dtype {array.dtype}")
    peak = int(array.max()) if array.size else 0
    if array.dtype == np.uint16 or 255 < peak <= 65535:
        high = 65535.0
    elif peak <= 255:
        high = 255.0
    else:
        high = float(np.iinfo(array.dtype).max)
    return np.clip(array.astype(np.float64) / high * 255.0, 0, 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Composed VLMs: how each family's processor writes an image into the text
# --------------------------------------------------------------------------------------------------------------
# Per VLM family (its `model_type`): the token its chat template writes for an image ("marker"), the rule that
# expands it per image, and the per-token image flags its forward reads. The expansion is text with special tokens
# in it, tokenized together with the template's neighbouring text, as the family's own processor does.
VLM_FAMILIES = {
    "qwen2_vl": {"marker": "<|image_pad|>", "expand": "grid", "token_types": "mm_token_type_ids"},
    "qwen2_5_vl": {"marker": "<|image_pad|>", "expand": "grid", "token_types": "mm_token_type_ids"},
    "qwen3_vl": {"marker": "<|image_pad|>", "expand": "grid", "token_types": "mm_token_type_ids"},
    "llava": {"marker": "<image>", "expand": "fixed"},
    "gemma3": {"marker": "<start_of_image>", "expand": "gemma3", "token_types": "token_type_ids"},
    "idefics3": {"marker": "<image>", "expand": "tiles"},
    "smolvlm": {"marker": "<image>", "expand": "tiles"},
}


def image_expansion(family: str, image_token: str, image_inputs: dict, index: int, image_seq_length, processor) -> str:
    """The text (special tokens included) that image `index` becomes in a `family` prompt, from its image
    processor's outputs: Qwen's patch grid merged `merge_size`², a fixed count (LLaVA), Gemma 3's block between its
    image boundary tokens, or Idefics3/SmolVLM's tiles (one block per crop, a line per row, then the global image)."""
    rule = VLM_FAMILIES[family]["expand"]
    if rule == "grid":
        merge = int(getattr(processor, "merge_size", 2))
        return image_token * (int(image_inputs["image_grid_thw"][index].prod()) // merge**2)
    if rule == "fixed":
        return image_token * int(image_seq_length)
    if rule == "gemma3":
        return f"\n\n<start_of_image>{image_token * int(image_seq_length)}<end_of_image>\n\n"
    # Per sample, a list over its images (one here).
    rows, cols = (_first(image_inputs[name][index]) for name in ("rows", "cols"))
    block = image_token * int(image_seq_length)
    global_image = f"<fake_token_around_image><global-img>{block}<fake_token_around_image>"
    if rows == 0 and cols == 0:
        return global_image
    tiles = "".join(
        "".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{block}" for c in range(cols)) + "\n"
        for r in range(rows)
    )
    return f"{tiles}\n{global_image}"


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


# Image-processor outputs that describe the expansion, not model inputs (the families' own processors drop them too).
EXPANSION_ONLY_OUTPUTS = ("rows", "cols", "num_crops")


# --------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------
class GSVAProcessor(ProcessorMixin):
    r"""Tokenizer + CLIP image processor + SAM image processor for GSVA.

    conv_template (`str`, defaults to `"llava_v1"`): `"llava_v1"` (Vicuna) or `"llava_llama_2"`, the conversation
        format whose chat template is used when `chat_template` is not given.
    chat_template (`str`, optional): a Jinja chat template (saved as `chat_template.jinja`); every prompt the
        processor builds, `__call__`'s included, comes from it (see `render_messages`).
    image_token (`str`, defaults to `"<image>"`): vocabulary token repeated `num_image_tokens` times per image.
    num_image_tokens (`int`, defaults to 256): visual tokens per image (CLIP patches without CLS).
    use_im_start_end (`bool`, defaults to True): wrap the image in `<im_start>`/`<im_end>` as GSVA does.
    backbone (`str`, optional): for a composed GSVA, the VLM's model type (a key of `VLM_FAMILIES`); the image
        processor, tokenizer and chat template are then the VLM's own and each image is expanded by its family's
        rule. None: LLaVA v1's layout, as GSVA released it.
    image_seq_length (`int`, optional): tokens per image (LLaVA-1.5, Gemma 3) or per crop (Idefics3, SmolVLM) of
        a composed VLM.
    """

    def __init__(
        self,
        image_processor=None,
        sam_image_processor=None,
        tokenizer=None,
        conv_template: str = "llava_v1",
        image_token: str = DEFAULT_IMAGE_TOKEN,
        num_image_tokens: int = 256,
        use_im_start_end: bool = True,
        chat_template=None,
        backbone: str | None = None,
        image_seq_length: int | None = None,
        **kwargs,
    ):
        if backbone is not None:
            if backbone not in VLM_FAMILIES:
                raise ValueError(
                    f"backbone {backbone!r} is not a VLM family GSVAProcessor knows how to prompt; known: "
                    f"{', '.join(sorted(VLM_FAMILIES))}"
                )
            if chat_template is None:
                raise ValueError(f"a composed GSVAProcessor needs the VLM's chat template (backbone {backbone!r})")
            use_im_start_end = False
        self.backbone = backbone
        self.image_seq_length = None if image_seq_length is None else int(image_seq_length)
        if chat_template is None:
            # A folder saved before chat templates has none: the format named by `conv_template` gives the same ids.
            chat_template = gsva_chat_template(conv_template, image_token, use_im_start_end)
        elif conv_template not in CHAT_TEMPLATE_BODIES:
            raise ValueError(f"conv_template must be one of {sorted(CHAT_TEMPLATE_BODIES)}, got {conv_template!r}")
        self.conv_template = conv_template
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        self.use_im_start_end = bool(use_im_start_end)
        super().__init__(image_processor, sam_image_processor, tokenizer, chat_template=chat_template)
        self.token_ids = self._check_special_tokens()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a folder or Hub repo. The sub-processors are built-in classes, so a saved folder's `auto_map`
        (written for AutoProcessor) must not trigger a remote-code prompt when this class is used directly."""
        kwargs.setdefault("trust_remote_code", False)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        # How this load found its files (offline or not) says nothing about the tokenizer: never save it with it.
        processor.tokenizer.init_kwargs.pop("local_files_only", None)
        return processor

    # ------------------------------------------------------------------ special tokens
    @staticmethod
    def add_gsva_tokens(tokenizer, image_token: str = DEFAULT_IMAGE_TOKEN) -> dict[str, int]:
        """Add `[SEG]`, `[REJ]`, `<im_start>`, `<im_end>` and the image token to a base tokenizer.

        Order follows GSVA (`[SEG]`, `[REJ]`, then `<im_start>`, `<im_end>`), so ids match the released models
        when the base tokenizer is the same; tokens that already exist keep their ids. All are added as special
        tokens so that text a user types is never turned into them; ones a tokenizer holds as ordinary added tokens
        (GSVA's own saved tokenizer has `[SEG]`/`[REJ]` so) are made special, keeping their ids. A pad token is
        set to `unk` when missing.
        """
        from transformers import AddedToken

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        vocab = tokenizer.get_vocab()
        tokens = (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN, image_token)
        missing = [t for t in tokens if t not in vocab]
        ordinary = [
            AddedToken(t, special=True, normalized=False)
            for t in tokens
            if t in vocab and tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True) == [vocab[t]]
        ]
        if missing or ordinary:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": missing + ordinary}, replace_extra_special_tokens=False
            )
        return {t: tokenizer.convert_tokens_to_ids(t) for t in (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN, image_token)}

    def _check_special_tokens(self) -> dict[str, int]:
        """Each GSVA token must be in the vocabulary and encode to exactly one id (LISA's Llama-2 `[SEG]` bug)."""
        ids = {}
        named = [("seg_token_id", SEG_TOKEN), ("rej_token_id", REJ_TOKEN)]
        if self.backbone is None:
            named += [("im_start_token_id", IM_START_TOKEN), ("im_end_token_id", IM_END_TOKEN)]
        for name, token in named + [("image_token_id", self.image_token)]:
            encoded = self.tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1 or token not in self.tokenizer.get_vocab():
                raise ValueError(
                    f"tokenizer encodes {token!r} to {encoded} instead of one id; add the GSVA tokens with "
                    "GSVAProcessor.add_gsva_tokens(tokenizer) before building the processor"
                )
            if self.tokenizer.encode(token, add_special_tokens=False, split_special_tokens=True) == encoded:
                raise ValueError(
                    f"tokenizer holds {token!r} (id {encoded[0]}) as an ordinary added token, so text a user types "
                    f"would become it; make the GSVA tokens special with GSVAProcessor.add_gsva_tokens(tokenizer) "
                    "(their ids stay the same) and save the tokenizer again"
                )
            ids[name] = encoded[0]
        if self.tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; GSVAProcessor.add_gsva_tokens sets it to unk")
        return ids

    def check_config(self, config: GSVAConfig) -> None:
        """Raise if the model config's token ids or image-token count disagree with this processor."""
        if (config.backbone_type == "llava_v1") != (self.backbone is None) or (
            self.backbone is not None and self.backbone != config.backbone_type
        ):
            raise ValueError(
                f"the model's backbone is {config.backbone_type!r} but this processor prompts "
                f"{self.backbone or 'llava_v1'!r}; load the processor saved with the model"
            )
        wrong = {name: (getattr(config, name), value) for name, value in self.token_ids.items() if getattr(config, name) != value}
        if wrong:
            detail = ", ".join(f"{n}: config {c} vs tokenizer {t}" for n, (c, t) in wrong.items())
            raise ValueError(f"model config and tokenizer disagree on token ids ({detail})")
        if self.backbone is None and config.num_image_tokens != self.num_image_tokens:
            raise ValueError(
                f"model makes {config.num_image_tokens} visual tokens per image but the processor inserts "
                f"{self.num_image_tokens} image tokens"
            )
        vocab = config.get_text_config().vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {vocab} rows")

    # ------------------------------------------------------------------ text
    @staticmethod
    def rounds_to_messages(rounds: list[tuple[str, str | None]]) -> list[dict]:
        """`(question, answer)` rounds as chat messages: the image opens the first question, as in every GSVA
        question template; a final round whose answer is None leaves the conversation at the user's turn."""
        if not isinstance(rounds, (list, tuple)) or not rounds:
            raise ValueError(f"a conversation must be a non-empty list of (question, answer) rounds, got {rounds!r}")
        messages = []
        for index, entry in enumerate(rounds):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"round {index}: expected a (question, answer) pair, got {entry!r}")
            question, answer = entry
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"round {index}: the question must be a non-empty string, got {question!r}")
            if answer is None and index != len(rounds) - 1:
                raise ValueError(f"round {index}: only the last round may have no answer")
            if answer is not None and not isinstance(answer, str):
                raise ValueError(f"round {index}: the answer must be a string or None, got {answer!r}")
            content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def render(self, rounds: list[tuple[str, str | None]]) -> list[tuple[str, str]]:
        """`(question, answer)` rounds → pieces, through the chat template (`rounds_to_messages`, then
        `render_messages`); a final answer of None ends with the generation prompt."""
        return self.render_messages(self.rounds_to_messages(rounds))

    def render_messages(
        self, messages: list[dict], add_generation_prompt: bool | None = None, chat_template: str | None = None
    ) -> list[tuple[str, str]]:
        """Chat messages → pieces `(kind, value)`: kind is "text", "answer" (trained on), "special" ("bos", "eos"
        or a GSVA token) or "image", in the order the chat template writes them.

        Typed text never becomes a special token, provably: the template is rendered with a placeholder in place of
        each text item (never the text itself), so the string split on the markers the template may write (bos,
        eos, `<im_start>`, `<im_end>`, the image token) holds only the template's own text; each text item is then
        put back as a piece of its own, tokenized with special tokens split. User and system text is "text"; an
        assistant's text is "answer", where only `[SEG]`/`[REJ]` outside `AnswerText`'s typed spans become slot
        tokens. The template's own text inside `{% generation %}` is answer too (llama-2's space before `</s>`).

        messages: an optional system message (replacing the default system prompt), then user and assistant turns
            in turn, starting with the user; content is a string or a list of `{"type": "image"}` and
            `{"type": "text", "text": ...}` items, with one image in the first user message.
        add_generation_prompt: None adds it when the last message is the user's (the prompt for `generate`).
        """
        structure, values = _message_structure(messages)
        if add_generation_prompt is None:
            add_generation_prompt = structure[-1][0] == "user"
        template = self._chat_template(chat_template)
        tokenizer = self.tokenizer
        variables = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token)
        marker, markers = self.image_token, ()
        if self.backbone is not None:
            marker, markers = VLM_FAMILIES[self.backbone]["marker"], self._special_token_texts()
        skeleton = _template_pieces(template, structure, bool(add_generation_prompt), variables, marker, markers)
        return [values[value] if kind == "content" else (kind, value) for kind, value in skeleton]

    def _special_token_texts(self) -> tuple[str, ...]:
        """Every special token of a composed VLM's tokenizer (`<|im_start|>`, `<start_of_turn>`, ...): the template's
        own text is split on them, so each becomes its one id and never meets typed text."""
        texts = {token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
        return tuple(sorted(texts - {SEG_TOKEN, REJ_TOKEN}))

    def _chat_template(self, chat_template: str | None = None) -> str:
        """The template to render: `chat_template` (a template, or the name of one of this processor's), else this
        processor's own (its "default" when it holds several)."""
        own = self.chat_template
        if chat_template is None:
            chat_template = own.get("default") if isinstance(own, dict) else own
            if chat_template is None:
                raise ValueError(f"this processor has no default chat template; it holds {sorted(own)}")
        elif isinstance(own, dict) and chat_template in own:
            chat_template = own[chat_template]
        return chat_template

    def prompt_text(self, rounds: list[tuple[str, str | None]]) -> str:
        """The conversation as one string (image shown once as its token), to inspect what the model reads; equal
        to `apply_chat_template(rounds_to_messages(rounds), add_generation_prompt=...)`."""
        names = {"eos": self.tokenizer.eos_token, "bos": self.tokenizer.bos_token}
        return "".join(names.get(value, value) if kind == "special" else value for kind, value in self.render(rounds))

    def _conversation_pieces(self, conversation, add_generation_prompt=None, chat_template=None) -> list[tuple]:
        """Pieces of a conversation given as `(question, answer)` rounds or as chat messages."""
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], dict):
            return self.render_messages(conversation, add_generation_prompt, chat_template)
        return self.render(conversation)

    def _plan_conversation(self, pieces: list[tuple[str, str]], image_text: str | None = None) -> list[tuple]:
        """A conversation's pieces as a list of steps: ("text", chunk, answer character spans) for the text between
        special tokens, ("token", id, label) and ("eos", id), whose label depends on whether an answer precedes it.
        The tokenizer's bos opens it (as the tokenizer would add it), unless the template writes one first.
        A composed VLM's image is `image_text` (`image_expansion`): its text joins the template's neighbouring text,
        its special tokens are tokens; the special token that closes an answer (the turn's end) is trained on."""
        bos = self.tokenizer.bos_token_id
        opened = bool(pieces) and pieces[0] == ("special", "bos")
        plan: list[tuple] = [] if bos is None or opened else [("token", bos, IGNORE_INDEX)]
        chunk, spans = "", []

        def flush():
            nonlocal chunk, spans
            if chunk:
                plan.append(("text", chunk, spans))
            chunk, spans = "", []

        composed = self.backbone is not None
        special_texts = self._special_token_texts() if composed else ()
        after_answer = False
        for kind, value in pieces:
            closes_answer, after_answer = after_answer, kind == "answer"
            if kind == "text":
                chunk += value
            elif kind == "answer":
                for part, is_slot in _answer_pieces(value):
                    if is_slot:
                        flush()
                        token_id = self.token_ids["seg_token_id" if part == SEG_TOKEN else "rej_token_id"]
                        plan.append(("token", token_id, token_id))
                    else:
                        spans.append((len(chunk), len(chunk) + len(part)))
                        chunk += part
            else:
                flush()
                if kind == "image" and composed:
                    if image_text is None:
                        raise ValueError("a composed VLM's conversation needs its image to be encoded")
                    for part in _split_on(image_text, special_texts):
                        if part in special_texts:
                            flush()
                            plan.append(("token", self.tokenizer.convert_tokens_to_ids(part), IGNORE_INDEX))
                        else:
                            chunk += part
                elif kind == "image":
                    plan += [("token", self.token_ids["image_token_id"], IGNORE_INDEX)] * self.num_image_tokens
                elif value == "eos":
                    plan.append(("eos", self.tokenizer.eos_token_id))
                elif composed and closes_answer:
                    plan.append(("eos", self.tokenizer.convert_tokens_to_ids(value)))
                elif value == "bos":
                    plan.append(("token", bos, IGNORE_INDEX))
                else:
                    plan.append(("token", self.tokenizer.convert_tokens_to_ids(value), IGNORE_INDEX))
        flush()
        return plan

    def encode_conversations(
        self,
        conversations: list,
        add_generation_prompt: bool | None = None,
        chat_template: str | None = None,
        image_texts: list[str] | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels (answers and their end-of-turn token only) for each conversation, given as
        `(question, answer)` rounds or as chat messages (`render_messages`).

        Text between special tokens is tokenized as one chunk (so ids match GSVA's legacy Llama tokenisation), all
        chunks of all conversations in one tokenizer call; `[SEG]`/`[REJ]` in answers become their tokens, while
        questions never produce special tokens.
        """
        image_texts = image_texts or [None] * len(conversations)
        plans = [
            self._plan_conversation(self._conversation_pieces(conversation, add_generation_prompt, chat_template), text)
            for conversation, text in zip(conversations, image_texts)
        ]
        texts = [step[1] for plan in plans for step in plan if step[0] == "text"]
        encodings = iter([])
        if texts:
            batch = self.tokenizer(
                texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
            )
            encodings = iter(zip(batch["input_ids"], batch["offset_mapping"]))
        encoded = []
        for plan in plans:
            ids: list[int] = []
            labels: list[int] = []
            for step in plan:
                if step[0] == "text":
                    chunk_ids, offsets = next(encodings)
                    ids.extend(chunk_ids)
                    for token_id, (start, end) in zip(chunk_ids, offsets):
                        in_answer = any(end > a_start and start < a_end for a_start, a_end in step[2])
                        labels.append(token_id if in_answer else IGNORE_INDEX)
                elif step[0] == "token":
                    ids.append(step[1])
                    labels.append(step[2])
                else:
                    ids.append(step[1])
                    labels.append(step[1] if _previous_is_answer(labels) else IGNORE_INDEX)
            encoded.append((ids, labels))
        return encoded

    def encode_conversation(self, rounds: list[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
        """`encode_conversations` for one conversation."""
        return self.encode_conversations([rounds])[0]

    def _pad_rows(self, encoded: list[tuple[list[int], list[int]]], padding_side: str):
        """`input_ids`, `attention_mask` and `labels` tensors of encoded rows, padded on `padding_side`."""
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(encoded):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
            labels[row, span] = torch.tensor(row_labels, dtype=torch.long)
        return input_ids, attention_mask, labels

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        **kwargs,
    ):
        """transformers' `apply_chat_template`. Without `tokenize`, the text the template renders. With it, the
        ids `render_messages` gives (typed text stays text), as a list (lists for a batch) or, with
        `return_tensors="pt"`, padded tensors; `return_dict` adds `attention_mask`, and `labels` when every
        conversation ends with an answer.

        Messages that carry their image (`{"type": "image", "image"|"path": ...}`, one per conversation) give
        `processor(images=..., conversations=...)`, the model's full inputs; that call adds the generation prompt
        exactly to conversations that end with the user's turn, so `add_generation_prompt` must say the same.
        """
        if not tokenize:
            return super().apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, **kwargs
            )
        if kwargs:
            raise TypeError(f"GSVAProcessor.apply_chat_template(tokenize=True) does not take {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        for messages in conversations:
            _message_structure(messages)
        answered = [messages[-1]["role"] == "assistant" for messages in conversations]
        images = [_message_images(messages) for messages in conversations]
        if any(images):
            if chat_template is not None:
                raise ValueError("with images in the messages, the processor's own chat template is used: drop chat_template")
            if not all(len(found) == 1 for found in images):
                raise ValueError(f"give one image per conversation in its messages, or none; got {[len(f) for f in images]}")
            if any(add_generation_prompt == done for done in answered):
                raise ValueError(
                    "with images the generation prompt is added exactly to conversations that end with the user's "
                    "turn: pass add_generation_prompt=True for those and False for conversations ending with an answer"
                )
            images = [found[0] for found in images]
            out = self(images=images, conversations=conversations, return_tensors=return_tensors or "pt")
            return out if return_dict else out["input_ids"]
        encoded = self.encode_conversations(conversations, add_generation_prompt, chat_template)
        with_labels = all(answered)
        if return_tensors == "pt":
            input_ids, attention_mask, labels = self._pad_rows(encoded, "right" if with_labels else "left")
        else:
            input_ids = [ids for ids, _ in encoded]
            attention_mask = [[1] * len(ids) for ids in input_ids]
            labels = [row_labels for _, row_labels in encoded]
            if not batched:
                input_ids, attention_mask, labels = input_ids[0], attention_mask[0], labels[0]
        if not return_dict:
            return input_ids
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            data["labels"] = labels
        return BatchFeature(data=data)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        answers: str | list[str] | None = None,
        conversations: list[list[tuple[str, str | None]]] | list[list[dict]] | None = None,
        targets: list[str] | list[list[str]] | None = None,
        return_tensors: str = "pt",
        padding_side: str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Encode images with one conversation each.

        text / answers: one question (and optionally its answer) per image. Without answers the prompt ends
        where the assistant starts (for `generate`), left-padded; with answers `labels` are returned and rows are
        right-padded. `conversations` gives several (question, answer) rounds per image instead, or chat messages
        (`render_messages`): one ending with the user's turn gets the generation prompt, one ending with an answer
        labels. Every prompt comes from the chat template.
        targets: phrases per image instead (target mode, for `model.decide_targets`): GSVA's question and answer
            template with one slot per phrase; no labels.
        max_length: raise (never truncate) when a row is longer.
        """
        if kwargs:
            raise TypeError(f"GSVAProcessor got unexpected arguments: {sorted(kwargs)}")
        if targets is not None:
            if text is not None or answers is not None or conversations is not None:
                raise ValueError("give `targets` alone, not with `text`, `answers` or `conversations`")
            count = len(images) if isinstance(images, (list, tuple)) else 1
            conversations = [[self.targets_conversation(p)] for p in self.segmentation_queries(count, targets=targets)]
        if conversations is None:
            if text is None:
                raise ValueError("give `text` (one question per image) or `conversations`")
            questions = [text] if isinstance(text, str) else list(text)
            if answers is None:
                replies = [None] * len(questions)
            else:
                replies = [answers] if isinstance(answers, str) else list(answers)
                if len(replies) != len(questions):
                    raise ValueError(f"got {len(questions)} questions but {len(replies)} answers")
            conversations = [[(q, a)] for q, a in zip(questions, replies)]
        if images is None:
            raise ValueError("GSVA needs one image per conversation; `images` is missing")
        image_list = [images] if not isinstance(images, (list, tuple)) else list(images)
        if len(image_list) != len(conversations):
            raise ValueError(f"got {len(image_list)} images but {len(conversations)} conversations")
        pil_images = [load_image(image) for image in image_list]
        self._check_aspect_ratios(pil_images)

        image_texts, image_inputs = None, None
        if self.backbone is not None:
            image_inputs, image_texts = self._composed_images(pil_images)
        encoded = self.encode_conversations(conversations, image_texts=image_texts)
        with_labels = all(_ends_with_answer(conversation) for conversation in conversations)
        if padding_side is None:
            padding_side = "right" if with_labels else "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        limit = max_length if max_length is not None else getattr(self.tokenizer, "model_max_length", None)
        for row, (ids, _) in enumerate(encoded):
            if limit is not None and limit < 10**9 and len(ids) > limit:
                images = ids.count(self.token_ids["image_token_id"])
                raise ValueError(
                    f"conversation {row} is {len(ids)} tokens long (with {images} image tokens), "
                    f"more than the limit of {limit}; shorten the text or raise max_length"
                )
        input_ids, attention_mask, labels = self._pad_rows(encoded, padding_side)

        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels and targets is None:
            data["labels"] = labels
        if image_inputs is None:
            data["pixel_values"] = self.image_processor(pil_images, return_tensors="pt")["pixel_values"]
        else:
            data.update(image_inputs)
            token_types = VLM_FAMILIES[self.backbone].get("token_types")
            if token_types:
                data[token_types] = (input_ids == self.token_ids["image_token_id"]).long()
        sam = self.sam_image_processor(pil_images, return_tensors="pt")
        data["sam_pixel_values"] = sam["pixel_values"]
        side, square = self.mask_input()
        sizes = [(image.height, image.width) for image in pil_images]
        data["original_sizes"] = torch.as_tensor(sizes, dtype=torch.long)
        data["reshaped_input_sizes"] = torch.as_tensor([mask_input_size(size, side, square) for size in sizes], dtype=torch.long)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _composed_images(self, images: list[Image.Image]) -> tuple[dict, list[str]]:
        """A composed VLM's image inputs (its image processor's outputs the model reads) and, per image, the text its
        placeholder becomes (`image_expansion`)."""
        tiles = VLM_FAMILIES[self.backbone]["expand"] == "tiles"
        extra = {"return_row_col_info": True} if tiles else {}
        # Tile families batch images per sample: one sample, one image each.
        outputs = self.image_processor([[image] for image in images] if tiles else images, return_tensors="pt", **extra)
        texts = [
            image_expansion(self.backbone, self.image_token, outputs, index, self.image_seq_length, self.image_processor)
            for index in range(len(images))
        ]
        inputs = {name: value for name, value in outputs.items() if name not in EXPANSION_ONLY_OUTPUTS}
        return inputs, texts

    def _check_aspect_ratios(self, images: list[Image.Image]) -> None:
        """SAM resizes the long side to its `longest_edge`; beyond 2 * longest_edge : 1 the short side would round
        to 0 pixels and SAM's processor fail, so such an image is refused here, naming this model's limit."""
        longest = (getattr(self.sam_image_processor, "size", None) or {}).get("longest_edge")
        if not longest:
            return
        why = f"SAM resizes the long side to {longest} pixels and the short side would become 0"
        for index, image in enumerate(images):
            _check_aspect_ratio(image.size, f"image {index}", "this model's limit", 2 * longest, why)

    # ------------------------------------------------------------------ outputs
    def decode_answer(self, token_ids) -> str:
        """Readable answer text: keeps `[SEG]`/`[REJ]`, drops padding, image and end-of-turn tokens."""
        drop = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.tokenizer.bos_token_id, self.token_ids["image_token_id"]}
        kept = [int(t) for t in token_ids if int(t) not in drop]
        text = self.tokenizer.decode(kept, skip_special_tokens=False).strip()
        return re.sub(r"(\[SEG\]|\[REJ\]) ([,.:;])", r"\1\2", text)

    @staticmethod
    def targets_question(phrases: list[str]) -> str:
        """A question over several phrases for free generation: GSVA's "What are ... in this image?" template."""
        return TARGETS_QUESTION.format(class_name=", ".join(_checked_phrases(phrases)).lower())

    @staticmethod
    def targets_conversation(phrases: list[str]) -> tuple[str, str]:
        """Target mode's (question, answer template): GSVA's evaluation prompt verbatim, one `[SEG]` slot per
        phrase (the model then decides each slot). Phrases are normalised by `target_phrase`."""
        cleaned = [target_phrase(p) for p in _checked_phrases(phrases)]
        if not all(cleaned):
            raise ValueError(f"targets must hold more than full stops and spaces, got {phrases!r}")
        return eval_question(cleaned), eval_answer(cleaned, [False] * len(cleaned))

    @staticmethod
    def segmentation_queries(count: int, text=None, targets=None) -> list:
        """Per image, the question (`text`) or the phrase list (`targets`); one of the two, broadcast when single."""
        if (text is None) == (targets is None):
            raise ValueError("give either `text` (a question per image) or `targets` (phrases per image)")
        if text is not None:
            questions = [text] * count if isinstance(text, str) else list(text)
            if len(questions) != count:
                raise ValueError(f"got {count} images but {len(questions)} texts")
            return questions
        if isinstance(targets, str):
            raise ValueError("targets must be a list of phrases (or one list per image), not a string")
        targets = list(targets)
        if targets and all(isinstance(t, str) for t in targets):
            per_image = [targets]
        elif all(isinstance(t, (list, tuple)) for t in targets):
            per_image = [list(t) for t in targets]
        else:
            raise ValueError(
                "targets must be one list of phrases for every image, or one list of phrases per image; got a mix of "
                f"phrases and lists: {targets!r}"
            )
        if len(per_image) == 1 and count > 1:
            per_image = per_image * count
        if len(per_image) != count:
            raise ValueError(f"got {count} images but {len(per_image)} target lists")
        for phrases in per_image:
            _checked_phrases(phrases)
        return per_image

    @staticmethod
    def answer_phrases(answer: str) -> list[str]:
        """Target phrases of a GSVA answer, one per `[SEG]`/`[REJ]`, without the answer templates' words."""
        phrases, previous = [], None
        for part in _split_answer(answer):
            if part in (SEG_TOKEN, REJ_TOKEN):
                phrases.append(_strip_template_words(previous or ""))
                previous = None
            else:
                previous = part
        return phrases

    def sam_longest_edge(self) -> int:
        """The long side the mask decoder's image processor resizes images to (SAM's `size["longest_edge"]`, the
        square's side for SAM 2)."""
        return self.mask_input()[0]

    def mask_input(self) -> tuple[int, bool]:
        """(side, square) of the mask decoder's input: SAM's processor resizes the longest side to `side` and pads
        (`size["longest_edge"]`); SAM 2's resizes the whole image to a `side` square (`size["height"]`)."""
        size = self.sam_image_processor.size
        if size.get("longest_edge"):
            return int(size["longest_edge"]), False
        if size.get("height") and size.get("height") == size.get("width"):
            return int(size["height"]), True
        raise ValueError(
            f"the mask decoder's image processor has size {dict(size)}; expected {{'longest_edge': n}} (SAM) or a "
            "square {'height': n, 'width': n} (SAM 2)"
        )

    def post_process_masks(
        self, masks: torch.Tensor, original_sizes, reshaped_input_sizes, slot_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """SAM's mask post-processing (`SamImageProcessor.post_process_masks`' names, logits kept): upsample the
        model's low-resolution masks `[B, S, h, w]` to SAM's padded input, crop each image's resized part, resize
        to its original size.

        original_sizes / reshaped_input_sizes: `[B, 2]` (height, width), as this processor returns them.
        slot_mask: `[B, S]` bool, the slots to post-process (default: all).
        Returns per image float32 logits `[k_i, H_i, W_i]` for its selected slots, in order.
        """
        if slot_mask is None:
            slot_mask = torch.ones(masks.shape[:2], dtype=torch.bool)
        if not (len(masks) == len(slot_mask) == len(original_sizes) == len(reshaped_input_sizes)):
            raise ValueError(
                f"post_process_masks got {len(masks)} mask rows, {len(slot_mask)} slot-mask rows, "
                f"{len(original_sizes)} original_sizes and {len(reshaped_input_sizes)} reshaped_input_sizes; "
                "give one per image"
            )
        side, square = self.mask_input()
        return upscale_slot_masks(
            masks, slot_mask, _size_list(original_sizes), _size_list(reshaped_input_sizes), side, square
        )

    def post_process_instance_segmentation(
        self,
        outputs,
        target_sizes=None,
        threshold: float = 0.0,
        targets: list[list[str]] | None = None,
        return_rle: bool = False,
    ) -> list[SegmentationResult]:
        """Per image: the answer and, per slot in order, phrase, rejected, bool mask at the original size, score.

        outputs: `model.generate(..., return_dict_in_generate=True)` with the SAM inputs (phrases are read from
            the generated answer; a slot whose phrase cannot be read, or an answer cut at `max_new_tokens`, is
            named in `warnings`), or `model.decide_targets(...)` with `targets`, the phrases asked per image.
        target_sizes: `[B, 2]` (height, width) of the images, `inputs["original_sizes"]` of this processor's
            output; the resized sizes follow from them and SAM's longest edge.
        threshold: mask logit threshold (GSVA: 0). return_rle: add each mask's COCO RLE.
        """
        if outputs.get("slot_is_seg") is None:
            raise ValueError(
                "these outputs hold no masks: use model.decide_targets(**processor(images=..., targets=...)) or "
                "model.generate(**processor(images=..., text=...), return_dict_in_generate=True)"
            )
        rows = len(outputs["slot_is_seg"])
        if target_sizes is None:
            raise ValueError(
                "post_process_instance_segmentation needs target_sizes, the image sizes: pass "
                'target_sizes=inputs["original_sizes"] from this processor\'s output'
            )
        sizes = _size_list(target_sizes)
        if len(sizes) != rows:
            raise ValueError(
                f"got {len(sizes)} target_sizes for {rows} output rows; with num_return_sequences=n give each image's "
                'size n times: inputs["original_sizes"].repeat_interleave(n, dim=0)'
            )
        from_targets = outputs.get("answer_ids") is None
        if from_targets and targets is None:
            raise ValueError("target-mode outputs need `targets`, the phrases asked per image")
        if from_targets and len(targets) != rows:
            raise ValueError(f"got {len(targets)} target lists for {rows} images")
        side, square = self.mask_input()
        reshaped = [mask_input_size(size, side, square) for size in sizes]
        seg_logits = self.post_process_masks(outputs["pred_masks"], sizes, reshaped, slot_mask=outputs["slot_is_seg"])
        results = []
        for row in range(rows):
            count = int(outputs["slot_mask"][row].sum())
            flags, scores = outputs["slot_is_seg"][row, :count].cpu(), outputs["slot_scores"][row, :count]
            logits = seg_logits[row].new_zeros((count, *sizes[row]))
            logits[flags.to(logits.device)] = seg_logits[row]
            _check_finite_outputs(row, flags, scores, logits)
            flags, scores = flags.tolist(), scores.tolist()
            warnings = []
            if from_targets:
                phrases = list(targets[row])
                if len(phrases) != len(flags):
                    raise ValueError(f"image {row}: {len(phrases)} phrases asked but the outputs hold {len(flags)} slots")
                answer = eval_answer([target_phrase(p) for p in phrases], [not f for f in flags])
            else:
                answer = self.decode_answer(outputs["answer_ids"][row].tolist())
                phrases = self.answer_phrases(answer)
                if len(phrases) != len(flags):
                    warnings.append(f"the answer has {len(flags)} slots but {len(phrases)} phrases could be read")
                    phrases = (phrases + [""] * len(flags))[: len(flags)]
                for slot, phrase in enumerate(phrases):
                    if not phrase:
                        warnings.append(f"slot {slot} has no phrase in the answer")
                if not outputs["finished"][row]:
                    warnings.append("the answer was cut at max_new_tokens: targets after it are missing")
            height, width = sizes[row]
            entries = []
            for slot, (is_seg, phrase) in enumerate(zip(flags, phrases)):
                if is_seg:
                    probabilities = logits[slot].float().sigmoid()
                    mask = logits[slot] > threshold
                    inside = probabilities[mask]
                    mask_score = float(inside.mean()) if inside.numel() else 0.0
                    mask = mask.cpu()
                else:
                    mask, mask_score = torch.zeros((height, width), dtype=torch.bool), 0.0
                rle = mask_to_rle(mask) if return_rle else None
                entries.append(SegmentedTarget(phrase, not is_seg, mask, float(scores[slot]), mask_score, rle))
            results.append(SegmentationResult(answer=answer, targets=entries, warnings=warnings))
        return results


def _size_list(sizes) -> list[tuple[int, int]]:
    """`[B, 2]` sizes (tensor, array or pairs) as (height, width) int tuples."""
    return [(int(size[0]), int(size[1])) for size in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]


def sam_reshaped_size(size, longest_edge: int) -> tuple[int, int]:
    """The (height, width) SAM's image processor resizes an image of `size` to: longest side `longest_edge`, the
    other rounded half up (`SamImageProcessor`'s rule), so a mask's size alone gives its resized input size."""
    height, width = int(size[0]), int(size[1])
    scale = longest_edge * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def mask_input_size(size, side: int, square: bool) -> tuple[int, int]:
    """The (height, width) the mask decoder's image processor resizes an image of `size` to: a `side` square (SAM 2,
    EdgeTAM) or SAM's longest side `side` (`sam_reshaped_size`)."""
    return (int(side), int(side)) if square else sam_reshaped_size(size, side)


def upscale_mask_logits(low_res: torch.Tensor, input_size, output_size, pad_size: int, square: bool = False) -> torch.Tensor:
    """SAM's mask post-processing: upsample `[n, h, w]` to the padded input, crop the resized image (`input_size`),
    resize to `output_size`; float32. `square` (SAM 2's rule, whose input is the whole image resized to a square):
    one bilinear resize of the low-resolution logits to `output_size`.

    Only the low-resolution rows and columns that the crop keeps are upsampled. With an integer ratio r,
    bilinear upsampling (align_corners=False) reads output pixel i from input position (i + 0.5) / r - 0.5
    whatever the input's extent, so upsampling the slice by r gives the full result's numbers on the crop.
    """
    height, width = int(input_size[0]), int(input_size[1])
    logits = low_res[:, None].float()
    if square:
        output = tuple(int(v) for v in output_size)
        return F.interpolate(logits, output, mode="bilinear", align_corners=False)[:, 0]
    ratio = pad_size // logits.shape[-1]
    if ratio * logits.shape[-1] == pad_size and logits.shape[-2] == logits.shape[-1]:
        # Output row i < height interpolates input rows floor((i + 0.5) / r - 0.5) and the next: < ceil(h / r) + 1.
        rows, cols = (min(logits.shape[-1], -(-size // ratio) + 1) for size in (height, width))
        logits = F.interpolate(logits[..., :rows, :cols], scale_factor=ratio, mode="bilinear", align_corners=False)
    else:
        logits = F.interpolate(logits, (pad_size, pad_size), mode="bilinear", align_corners=False)
    logits = logits[..., :height, :width]
    output = tuple(int(v) for v in output_size)
    if output != (height, width):
        logits = F.interpolate(logits, output, mode="bilinear", align_corners=False)
    return logits[:, 0]


def upscale_slot_masks(
    masks: torch.Tensor, keep: torch.Tensor, output_sizes, input_sizes, pad_size: int, square: bool = False
) -> list[torch.Tensor]:
    """`upscale_mask_logits` for the slots `keep` `[B, S]` of `masks` `[B, S, h, w]`: per row `[k_i, H_i, W_i]`.

    Rows that share (input, output) sizes are upsampled together, one interpolation per size pair."""
    keep = keep.to(masks.device)
    counts = keep.sum(1).tolist()
    sizes = [tuple(int(v) for v in i) + tuple(int(v) for v in o) for i, o in zip(input_sizes, output_sizes)]
    out: list[torch.Tensor | None] = [None] * len(counts)
    for key in dict.fromkeys(sizes):
        members = [row for row, size in enumerate(sizes) if size == key]
        selected = torch.cat([masks[row][keep[row]] for row in members])
        if selected.shape[0] == 0:
            upsampled = masks.new_zeros((0, *key[2:]), dtype=torch.float32)
        else:
            upsampled = upscale_mask_logits(selected, key[:2], key[2:], pad_size, square)
        for row, part in zip(members, upsampled.split([counts[row] for row in members])):
            out[row] = part
    return out

def _check_finite_outputs(row: int, flags: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse NaN or infinite slot scores and mask logits, naming the image row and slots: NaN compares false, so
    it would otherwise read as a decision (every target present, or an empty mask) and as `NaN` in JSON."""
    problems = [f"slot {slot} score {value}" for slot, value in enumerate(scores.tolist()) if not np.isfinite(value)]
    for slot, is_seg in enumerate(flags.tolist()):
        if is_seg and not bool(torch.isfinite(logits[slot]).all()):
            problems.append(f"slot {slot} mask logits")
    if problems:
        raise ValueError(
            f"image {row}: the model's outputs are not finite ({', '.join(problems)}); its weights hold NaN or "
            "infinity, or the dtype overflows (try fp32)"
        )


def target_phrase(phrase: str) -> str:
    """A user's phrase as target mode writes it: GSVA's `clean_sentence`, with runs of whitespace made one space
    (a stray space or line break next to a removed full stop would otherwise reach the prompt)."""
    return " ".join(clean_sentence(phrase).split())


def _checked_phrases(phrases) -> list[str]:
    if isinstance(phrases, str) or not phrases or any(not isinstance(p, str) or not p.strip() for p in phrases):
        raise ValueError(f"targets must be a non-empty list of non-empty phrases, got {phrases!r}")
    return [p.strip() for p in phrases]


_SLOT = re.compile(re.escape(SEG_TOKEN) + "|" + re.escape(REJ_TOKEN))


def _answer_pieces(answer: str) -> list[tuple[str, bool]]:
    """An answer as `(text, is_slot)` pieces: every `[SEG]`/`[REJ]` outside its typed text (`AnswerText.literal`)
    is a slot."""
    literal = getattr(answer, "literal", ())
    pieces, start = [], 0
    for match in _SLOT.finditer(answer):
        if any(begin < match.end() and match.start() < end for begin, end in literal):
            continue
        if match.start() > start:
            pieces.append((answer[start : match.start()], False))
        pieces.append((match.group(), True))
        start = match.end()
    if start < len(answer):
        pieces.append((answer[start:], False))
    return pieces


def _split_answer(answer: str) -> list[str]:
    """Split an answer on its `[SEG]`/`[REJ]` slots, keeping them as separate parts."""
    return [piece for piece, _ in _answer_pieces(answer)]


_TEMPLATE_OPENINGS = sorted(
    {start.lower() for start, _, _ in MULTI_TARGET_ANSWER_STYLES} | {"they are", "it is", "and", ","}, key=len, reverse=True
)
_TEMPLATE_PREFIXES = ("the mask of ", "the segmentation of ", "the referred ", "the segmentation result is")


def _strip_template_words(text: str) -> str:
    """Remove the answer templates' own words around a target phrase ("Sure, the mask of X is" → "X")."""
    phrase = text.strip(" ,.:")
    stripped = True
    while stripped:
        stripped = False
        for opening in _TEMPLATE_OPENINGS:
            if phrase.lower().startswith(opening):
                phrase, stripped = phrase[len(opening) :].strip(" ,.:"), True
    for prefix in _TEMPLATE_PREFIXES:
        if phrase.lower().startswith(prefix):
            phrase = phrase[len(prefix) :]
    if phrase.lower().endswith(" is"):
        phrase = phrase[:-3]
    return phrase.strip(" ,.:")


def _split_on(text: str, tokens: tuple[str, ...]) -> list[str]:
    """`text` cut before and after each occurrence of `tokens` (longest first), empty parts dropped."""
    if not tokens:
        return [text] if text else []
    pattern = "(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")"
    return [part for part in re.split(pattern, text) if part]


def _previous_is_answer(labels: list[int]) -> bool:
    return bool(labels) and labels[-1] != IGNORE_INDEX


def _ends_with_answer(conversation) -> bool:
    """Whether a conversation (rounds or chat messages) ends with an answer, i.e. is encoded with labels."""
    last = conversation[-1]
    return last.get("role") == "assistant" if isinstance(last, dict) else last[1] is not None


def _message_images(messages) -> list:
    """The images a conversation's messages carry (`{"type": "image", "image"|"path"|"url": ...}` items)."""
    found = []
    for message in messages if isinstance(messages, (list, tuple)) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, (list, tuple)) else ():
            if isinstance(item, dict) and item.get("type") == "image":
                found += [item[key] for key in ("image", "path", "url") if item.get(key) is not None]
    return found


def _message_structure(messages) -> tuple[tuple, list[tuple[str, str]]]:
    """Check chat messages against GSVA's conversation format and split them into their structure (roles and item
    types: what the template's output depends on besides the text) and their text items as pieces, in order."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {messages!r}")
    structure, values, images = [], [], 0
    expected, first_user = "user", 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index}: expected a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role == "system" and index == 0:
            pass
        elif role != expected:
            raise ValueError(
                f"message {index}: expected role {expected!r}, got {role!r}; GSVA's conversations are an optional "
                "system message, then user and assistant turns in turn, starting with the user"
            )
        else:
            expected = "assistant" if role == "user" else "user"
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"message {index}: content must be a string or a list of items, got {content!r}")
        kinds, typed = [], ""
        for item in items:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                values.append(("answer" if role == "assistant" else "text", item["text"]))
                typed += item["text"]
            elif kind == "image" and role == "user" and images == 0 and index == first_user:
                images += 1
            else:
                raise ValueError(
                    f"message {index} ({role}): content items must be {{'type': 'text', 'text': str}} or, once in the "
                    f"first user message, {{'type': 'image'}}; got {item!r}"
                )
            kinds.append(kind)
        if role == "user" and not typed.strip():
            raise ValueError(f"message {index}: the user's text must not be empty")
        structure.append((role, None if isinstance(content, str) else tuple(kinds)))
    if images != 1:
        raise ValueError("GSVA reads one image per conversation: put {'type': 'image'} in the first user message")
    return tuple(structure), values


# A text item's stand-in while the template renders: private-use characters, so it can meet no marker, with spaces
# and both letter cases, so a template that trims or re-cases text is caught instead of silently mis-encoded.
_PLACEHOLDER = " \ue000{}aZ\ue001 "


@lru_cache(maxsize=256)
def _template_pieces(
    template: str, structure: tuple, add_generation_prompt: bool, variables: tuple, image_token: str, markers: tuple = ()
):
    """What `template` writes for a conversation of this structure, as pieces with ("content", n) in place of the
    n-th text item. Depends on no text, so one rendering serves every conversation of a batch.

    variables: the tokenizer's bos, eos, unk and pad tokens (`bos_token`... in the template); bos, eos,
    `<im_start>`, `<im_end>`, `image_token` and `markers` (a composed VLM's special tokens) are the markers the
    template's own text is split on."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, count = [], 0
    for role, kinds in structure:
        if kinds is None:
            content, count = _PLACEHOLDER.format(count), count + 1
        else:
            content = []
            for kind in kinds:
                if kind == "image":
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": _PLACEHOLDER.format(count)})
                    count += 1
        messages.append({"role": role, "content": content})
    tracked = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
    variable_names = ("bos_token", "eos_token", "unk_token", "pad_token")
    rendered, generation = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=tracked,
        **{name: value for name, value in zip(variable_names, variables) if value is not None},
    )
    rendered, spans = rendered[0], generation[0] if tracked else []
    bos, eos = variables[:2]
    names = {IM_START_TOKEN: ("special", IM_START_TOKEN), IM_END_TOKEN: ("special", IM_END_TOKEN)}
    names.update({marker: ("special", marker) for marker in markers})
    names[image_token] = ("image", image_token)
    names.update({token: ("special", name) for token, name in ((bos, "bos"), (eos, "eos")) if token})
    placeholders = [_PLACEHOLDER.format(n) for n in range(count)]
    pattern = "|".join(re.escape(p) for p in placeholders + sorted(names, key=len, reverse=True))
    pieces, position, seen = [], 0, [0] * count

    def template_text(start: int, end: int) -> None:
        """The template's own text, as answer inside `{% generation %}` spans and plain text outside them."""
        cuts = sorted({start, end} | {c for span in spans for c in span if start < c < end})
        for begin, stop in zip(cuts, cuts[1:]):
            text = rendered[begin:stop]
            inside = any(a <= begin < b for a, b in spans)
            pieces.append(("answer", AnswerText.join([(text, True)])) if inside else ("text", text))

    for match in re.finditer(pattern, rendered):
        template_text(position, match.start())
        if match.group() in names:
            pieces.append(names[match.group()])
        else:
            number = placeholders.index(match.group())
            seen[number] += 1
            pieces.append(("content", number))
        position = match.end()
    template_text(position, len(rendered))
    if any(times != 1 for times in seen):
        raise ValueError(
            "the chat template must write each text item of the messages once, unchanged (no trimming or case "
            f"change); it wrote them {seen} times"
        )
    images = sum(kind == "image" for kind, _ in pieces)
    if images != 1:
        raise ValueError(
            f"the chat template writes the image token {image_token!r} {images} times for the conversation's one "
            "image; it must write it once, where the {'type': 'image'} item is"
        )
    return tuple(pieces)


GSVAProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AnswerText", "GSVAProcessor", "SegmentationResult", "SegmentedTarget", "mask_to_rle"]
