"""GSVA's training prompt augmentation: the question and answer templates the data readers draw from.

Verbatim from GSVA's `utils/utils.py` lists; question templates are stored without GSVA's leading "<image>\\n"
(the chat template puts the image first, followed by "\\n"). What a model user needs at inference (target mode's
question and answer, the answer layouts read back from generated text) stays in the Hub file `processing_gsva.py`,
which these build on; this module is training data only and is not shipped with a model.
"""

import random

from processing_gsva import MULTI_TARGET_ANSWER_STYLES, REJ_TOKEN, SEG_TOKEN, TARGETS_QUESTION, AnswerText

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
    TARGETS_QUESTION,
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
