"""GSVAProcessor: tokenizer + CLIP image processor + SAM image processor, and GSVA's prompt templates.

All prompt text GSVA uses (conversation templates, question and answer templates) is defined here, once.
Shipped with a Hub repository for ``trust_remote_code``: imports only torch, transformers and its sibling files.
"""

import random
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
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
# Prompt templates (GSVA `model/llava/constants.py` and `conversation.py`, verbatim). Question templates are
# stored without GSVA's leading "<image>\n": the processor always puts the image first, followed by "\n".
# --------------------------------------------------------------------------------------------------------------
SHORT_QUESTION_LIST = [
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
]
SHORT_QUESTION_LIST_MODE4 = [
    "Can you segment {class_name} in this image?",
    "Please segment {class_name} in this image.",
    "What are {class_name} in this image? Please respond with segmentation masks.",
    "What are {class_name} in this image? Please output segmentation masks.",
]
LONG_QUESTION_LIST = [
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
]
EXPLANATORY_QUESTION_LIST = [
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explaination.",
]
ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]
# (start, per-target template, end) of GSVA's multi-target answers (ANSWER_LIST_MODE4_*).
MULTI_TARGET_ANSWER_STYLES = [
    ("The segmentation results are", "{class_name} [SEG]", "."),
    ("Sure, they are", "{class_name}:[SEG]", "."),
    ("Sure,", "the mask of {class_name} is [SEG]", "."),
    ("Sure,", "the segmentation of {class_name} is [SEG]", "."),
    ("Sure,", "the referred {class_name} is [SEG]", "."),
]


def multi_target_question(class_names: list[str], rng: random.Random | None = None, style: int | None = None) -> str:
    """A GSVA training question over several targets (`SHORT_QUESTION_LIST_MODE4`), names lower-cased."""
    if style is None:
        style = (rng or random).randrange(len(SHORT_QUESTION_LIST_MODE4))
    return SHORT_QUESTION_LIST_MODE4[style].format(class_name=", ".join(class_names).lower())


def multi_target_answer(
    class_names: list[str],
    rejected: list[bool],
    rng: random.Random | None = None,
    style: int | None = None,
    separator: str = ", ",
) -> str:
    """A GSVA training answer: `START part, part END`, `[SEG]` → `[REJ]` for absent targets.

    refer_seg joins parts with ", ", sem_seg with "," (GSVA's own difference, kept).
    """
    if len(class_names) != len(rejected):
        raise ValueError(f"got {len(class_names)} class names but {len(rejected)} rejected flags")
    if style is None:
        style = (rng or random).randrange(len(MULTI_TARGET_ANSWER_STYLES))
    start, template, end = MULTI_TARGET_ANSWER_STYLES[style]
    before, after = template.split("{class_name}")
    parts = [(start + " ", False)]
    for index, (name, is_rejected) in enumerate(zip(class_names, rejected)):
        slot = after.replace(SEG_TOKEN, REJ_TOKEN) if is_rejected else after
        parts += [((separator if index else "") + before, False), (name, True), (slot, False)]
    return AnswerText.join(parts + [(end, False)])


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


@dataclass(frozen=True)
class ConversationTemplate:
    """How one conversation becomes text. Pieces are rendered by `GSVAProcessor.render`."""

    name: str
    system: str
    user_role: str
    assistant_role: str
    style: str  # "two" (vicuna v1) or "llama_2"


CONVERSATION_TEMPLATES = {
    "llava_v1": ConversationTemplate(
        name="llava_v1",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        user_role="USER",
        assistant_role="ASSISTANT",
        style="two",
    ),
    "llava_llama_2": ConversationTemplate(
        name="llava_llama_2",
        system="You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language.",
        user_role="USER",
        assistant_role="ASSISTANT",
        style="llama_2",
    ),
}


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
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"image {name!r} is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
            f"beyond the limit of {MAX_ASPECT_RATIO}:1 (SAM's resize would leave its short side 0 pixels); crop it first"
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
# Processor
# --------------------------------------------------------------------------------------------------------------
class GSVAProcessor(ProcessorMixin):
    r"""Tokenizer + CLIP image processor + SAM image processor for GSVA.

    conv_template (`str`, defaults to `"llava_v1"`): `"llava_v1"` (Vicuna) or `"llava_llama_2"`.
    image_token (`str`, defaults to `"<image>"`): vocabulary token repeated `num_image_tokens` times per image.
    num_image_tokens (`int`, defaults to 256): visual tokens per image (CLIP patches without CLS).
    use_im_start_end (`bool`, defaults to True): wrap the image in `<im_start>`/`<im_end>` as GSVA does.
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
        **kwargs,
    ):
        if conv_template not in CONVERSATION_TEMPLATES:
            raise ValueError(
                f"conv_template must be one of {sorted(CONVERSATION_TEMPLATES)}, got {conv_template!r}"
            )
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
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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
        for name, token in (
            ("seg_token_id", SEG_TOKEN),
            ("rej_token_id", REJ_TOKEN),
            ("im_start_token_id", IM_START_TOKEN),
            ("im_end_token_id", IM_END_TOKEN),
            ("image_token_id", self.image_token),
        ):
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
        wrong = {name: (getattr(config, name), value) for name, value in self.token_ids.items() if getattr(config, name) != value}
        if wrong:
            detail = ", ".join(f"{n}: config {c} vs tokenizer {t}" for n, (c, t) in wrong.items())
            raise ValueError(f"model config and tokenizer disagree on token ids ({detail})")
        if config.num_image_tokens != self.num_image_tokens:
            raise ValueError(
                f"model makes {config.num_image_tokens} visual tokens per image but the processor inserts "
                f"{self.num_image_tokens} image tokens"
            )
        vocab = config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {vocab} rows")

    # ------------------------------------------------------------------ text
    def render(self, rounds: list[tuple[str, str | None]]) -> list[tuple[str, str]]:
        """Conversation → pieces `(kind, value)`: kind is "text", "answer" (trained on), "special", "image".

        The image always opens the first user turn, followed by "\n", as in every GSVA question template.
        A final round whose answer is None ends with the assistant prompt for generation.
        """
        template = CONVERSATION_TEMPLATES[self.conv_template]
        pieces: list[tuple[str, str]] = []
        for index, (question, answer) in enumerate(rounds):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"round {index}: the question must be a non-empty string, got {question!r}")
            if answer is None and index != len(rounds) - 1:
                raise ValueError(f"round {index}: only the last round may have no answer")
            user_pieces: list[tuple[str, str]] = []
            if index == 0:
                if self.use_im_start_end:
                    user_pieces += [("special", IM_START_TOKEN), ("image", self.image_token), ("special", IM_END_TOKEN)]
                else:
                    user_pieces.append(("image", self.image_token))
                user_pieces.append(("text", "\n"))
            user_pieces.append(("text", question))
            if template.style == "two":
                opening = template.system + " " if index == 0 else ""
                pieces.append(("text", opening + template.user_role + ": "))
                pieces += user_pieces
                pieces.append(("text", " " + template.assistant_role + ":"))
                if answer is not None:
                    pieces += [("text", " "), ("answer", answer), ("special", "eos")]
            else:
                if index > 0:
                    pieces.append(("special", "bos"))
                opening = "[INST] " + (f"<<SYS>>\n{template.system}\n<</SYS>>\n\n" if index == 0 else "")
                pieces.append(("text", opening))
                pieces += user_pieces
                pieces.append(("text", " [/INST]"))
                if answer is not None:
                    pieces += [("text", " "), ("answer", answer), ("answer", " "), ("special", "eos")]
        return pieces

    def prompt_text(self, rounds: list[tuple[str, str | None]]) -> str:
        """The conversation as one string (image shown once as its token), to inspect what the model reads."""
        names = {"eos": self.tokenizer.eos_token, "bos": self.tokenizer.bos_token}
        return "".join(names.get(value, value) if kind == "special" else value for kind, value in self.render(rounds))

    def _plan_conversation(self, rounds: list[tuple[str, str | None]]) -> list[tuple]:
        """The conversation as a list of steps: ("text", chunk, answer character spans) for the text between special
        tokens, ("token", id, label) and ("eos",), whose label depends on whether an answer precedes it."""
        bos = self.tokenizer.bos_token_id
        plan: list[tuple] = [] if bos is None else [("token", bos, IGNORE_INDEX)]
        chunk, spans = "", []

        def flush():
            nonlocal chunk, spans
            if chunk:
                plan.append(("text", chunk, spans))
            chunk, spans = "", []

        for kind, value in self.render(rounds):
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
                if kind == "image":
                    plan += [("token", self.token_ids["image_token_id"], IGNORE_INDEX)] * self.num_image_tokens
                elif value == "eos":
                    plan.append(("eos",))
                elif value == "bos":
                    plan.append(("token", bos, IGNORE_INDEX))
                else:
                    plan.append(("token", self.tokenizer.convert_tokens_to_ids(value), IGNORE_INDEX))
        flush()
        return plan

    def encode_conversations(self, conversations: list[list[tuple[str, str | None]]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels (answers and their end-of-turn token only) for each conversation.

        Text between special tokens is tokenized as one chunk (so ids match GSVA's legacy Llama tokenisation), all
        chunks of all conversations in one tokenizer call; `[SEG]`/`[REJ]` in answers become their tokens, while
        questions never produce special tokens.
        """
        plans = [self._plan_conversation(rounds) for rounds in conversations]
        texts = [step[1] for plan in plans for step in plan if step[0] == "text"]
        encodings = iter([])
        if texts:
            batch = self.tokenizer(
                texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
            )
            encodings = iter(zip(batch["input_ids"], batch["offset_mapping"]))
        eos = self.tokenizer.eos_token_id
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
                    ids.append(eos)
                    labels.append(eos if _previous_is_answer(labels) else IGNORE_INDEX)
            encoded.append((ids, labels))
        return encoded

    def encode_conversation(self, rounds: list[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
        """`encode_conversations` for one conversation."""
        return self.encode_conversations([rounds])[0]

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        answers: str | list[str] | None = None,
        conversations: list[list[tuple[str, str | None]]] | None = None,
        targets: list[str] | list[list[str]] | None = None,
        return_tensors: str = "pt",
        padding_side: str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Encode images with one conversation each.

        text / answers: one question (and optionally its answer) per image. Without answers the prompt ends
        where the assistant starts (for `generate`), left-padded; with answers `labels` are returned and rows are
        right-padded. `conversations` gives several (question, answer) rounds per image instead.
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

        encoded = self.encode_conversations(conversations)
        with_labels = all(rounds[-1][1] is not None for rounds in conversations)
        if padding_side is None:
            padding_side = "right" if with_labels else "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        limit = max_length if max_length is not None else getattr(self.tokenizer, "model_max_length", None)
        for row, (ids, _) in enumerate(encoded):
            if limit is not None and limit < 10**9 and len(ids) > limit:
                raise ValueError(
                    f"conversation {row} is {len(ids)} tokens long (with {self.num_image_tokens} image tokens), "
                    f"more than the limit of {limit}; shorten the text or raise max_length"
                )
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

        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels and targets is None:
            data["labels"] = labels
        data["pixel_values"] = self.image_processor(pil_images, return_tensors="pt")["pixel_values"]
        sam = self.sam_image_processor(pil_images, return_tensors="pt")
        data["sam_pixel_values"] = sam["pixel_values"]
        data["original_sizes"] = torch.as_tensor(sam["original_sizes"], dtype=torch.long)
        data["resized_sizes"] = torch.as_tensor(sam["reshaped_input_sizes"], dtype=torch.long)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_aspect_ratios(self, images: list[Image.Image]) -> None:
        """SAM resizes the long side to its `longest_edge`; beyond 2 * longest_edge : 1 the short side would round
        to 0 pixels and SAM's processor fail, so such an image is refused here, naming this model's limit."""
        longest = (getattr(self.sam_image_processor, "size", None) or {}).get("longest_edge")
        if not longest:
            return
        for index, image in enumerate(images):
            width, height = image.size
            if max(width, height) > 2 * longest * min(width, height):
                raise ValueError(
                    f"image {index} is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
                    f"beyond this model's limit of {2 * longest}:1 (SAM resizes the long side to {longest} pixels and "
                    "the short side would become 0); crop it first"
                )

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
        return multi_target_question(_checked_phrases(phrases), style=3)

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

    def post_process_instance_segmentation(
        self, outputs, threshold: float = 0.0, targets: list[list[str]] | None = None, return_rle: bool = False
    ) -> list[SegmentationResult]:
        """Per image: the answer and, per slot in order, phrase, rejected, bool mask at the original size, score.

        outputs: `model.generate(..., return_dict_in_generate=True)` with the SAM inputs (phrases are read from
            the generated answer; a slot whose phrase cannot be read, or an answer cut at `max_new_tokens`, is
            named in `warnings`), or `model.decide_targets(...)` with `targets`, the phrases asked per image.
        threshold: mask logit threshold (GSVA: 0). return_rle: add each mask's COCO RLE.
        """
        if outputs.get("target_is_seg") is None:
            raise ValueError(
                "these outputs hold no masks: use model.decide_targets(**processor(images=..., targets=...)) or "
                "model.generate(**processor(images=..., text=...), return_dict_in_generate=True)"
            )
        from_targets = outputs.get("answer_ids") is None
        if from_targets and targets is None:
            raise ValueError("target-mode outputs need `targets`, the phrases asked per image")
        if from_targets and len(targets) != len(outputs["target_is_seg"]):
            raise ValueError(f"got {len(targets)} target lists for {len(outputs['target_is_seg'])} images")
        results = []
        fields = zip(outputs["target_is_seg"], outputs["slot_scores"], outputs["pred_masks"])
        for row, (flags, scores, logits) in enumerate(fields):
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
            height, width = (int(v) for v in outputs["original_sizes"][row])
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


def _previous_is_answer(labels: list[int]) -> bool:
    return bool(labels) and labels[-1] != IGNORE_INDEX


GSVAProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AnswerText", "GSVAProcessor", "SegmentationResult", "SegmentedTarget", "mask_to_rle"]
