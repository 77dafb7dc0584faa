"""LLaVA-Instruct visual question answering (`llava_dataset/<vqa_data>.json`, images `coco/train2017/<image>`).

Text-only samples: multi-round conversations with no `[SEG]`, so masks are `[0, H, W]`.
"""

import json
from pathlib import Path

import numpy as np
import torch

from processing_gsva import DEFAULT_IMAGE_TOKEN, AnswerText

from .guards import AnnotationError, safe_join
from .images import open_dataset_image
from .reason_seg import read_json_file
from .sample import Sample
from .seeding import check_index, index_rng

ROLES = ("human", "gpt")


def conversation_rounds(turns, where: str) -> list[tuple[str, str]]:
    """LLaVA `conversations` → (question, answer) rounds.

    A leading non-human turn is dropped (GSVA); turns must then alternate human/gpt and end with gpt. The
    `<image>` tag is removed and the text stripped wherever it occurs, since the processor always puts the image
    before the first question, followed by "\\n" (GSVA moves the tag to the start of its turn the same way).
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{where}, turn {index}: needs 'from' in {list(ROLES)} and a string 'value', got {turn!r:.200}"
            )
    start = 0 if turns[0]["from"] == "human" else 1
    kept = turns[start:]
    if not kept or len(kept) % 2:
        raise ValueError(f"{where}: after the leading non-human turn, {len(kept)} turns do not form human/gpt pairs")
    rounds = []
    for offset in range(0, len(kept), 2):
        for position, role in enumerate(ROLES):
            if kept[offset + position]["from"] != role:
                raise ValueError(
                    f"{where}, turn {start + offset + position}: expected a {role!r} turn, "
                    f"got {kept[offset + position]['from']!r}"
                )
        question, answer = (_strip_image_tag(kept[offset + k]["value"]) for k in (0, 1))
        rounds.append((question, AnswerText.join([(answer, True)])))  # dataset text: a "[SEG]" in it stays text
    return rounds


def _strip_image_tag(text: str) -> str:
    return text.replace(DEFAULT_IMAGE_TOKEN, "").strip() if DEFAULT_IMAGE_TOKEN in text else text


class VQADataset(torch.utils.data.Dataset):
    """LLaVA-Instruct-150k conversations as text-only `Sample`s.

    The entries are kept as one UTF-8 blob plus an offsets array (not 150k Python dicts), so forked DataLoader
    workers do not copy them page by page through reference counting. Each entry is checked when it is read.
    `samples_per_epoch=None` iterates entries in file order; an int draws a uniform entry per index.
    """

    source = "vqa"

    def __init__(
        self,
        dataset_dir,
        vqa_data: str = "llava_instruct_150k",
        seed: int = 0,
        samples_per_epoch: int | None = None,
    ):
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive or None, got {samples_per_epoch}")
        self.dataset_dir = Path(dataset_dir)
        self.json_path = self.dataset_dir / "llava_dataset" / f"{vqa_data}.json"
        self.image_root = self.dataset_dir / "coco" / "train2017"
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        entries = read_json_file(self.json_path)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"VQA file {str(self.json_path)!r} must hold a non-empty JSON list")
        encoded = [json.dumps(entry, ensure_ascii=False).encode("utf-8") for entry in entries]
        self._offsets = np.cumsum([0] + [len(item) for item in encoded], dtype=np.int64)
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self.samples_per_epoch is None else self.samples_per_epoch

    def entry(self, entry_index: int) -> dict:
        start, end = int(self._offsets[entry_index]), int(self._offsets[entry_index + 1])
        return json.loads(self._blob[start:end].decode("utf-8"))

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        if self.samples_per_epoch is None:
            entry_index = index
        else:
            entry_index = index_rng(self.seed, index, self.source).randrange(len(self._offsets) - 1)
        entry = self.entry(entry_index)
        where = f"VQA file {str(self.json_path)!r}, entry {entry_index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ValueError(f"{where}: needs a string 'image'")
        if "id" in entry:
            where += f" (id {entry['id']!r})"
        rounds = conversation_rounds(entry.get("conversations"), where)
        try:
            image_path = Path(safe_join(self.image_root, entry["image"]))
        except AnnotationError as error:
            raise ValueError(f"{where}: {error}") from error
        image = open_dataset_image(image_path)
        return Sample(
            image=image,
            rounds=rounds,
            masks=np.zeros((0, image.height, image.width), dtype=bool),
            image_path=str(image_path),
            source=self.source,
            meta={"entry": entry_index, "id": entry.get("id")},
        )
