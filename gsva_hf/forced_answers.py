"""A logits processor that makes `generate()` emit given answers: benchmarks and tests control the targets."""

import torch
from transformers import LogitsProcessor

from processing_gsva import IGNORE_INDEX


class ForceAnswers(LogitsProcessor):
    """Row r emits `answers[r]` token by token after the prompt, then end-of-sequence."""

    def __init__(self, answers: list[list[int]], prompt_length: int, eos_token_id: int):
        self.answers, self.prompt_length, self.eos_token_id = answers, prompt_length, eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -1e4)
        for row, answer in enumerate(self.answers):
            forced[row, answer[step] if step < len(answer) else self.eos_token_id] = 0.0
        return scores + forced


def answer_token_ids(processor, answer: str) -> list[int]:
    """The ids the processor trains on for `answer` (answer tokens and the end-of-turn token)."""
    ids, labels = processor.encode_conversation([("q", answer)])
    return [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
