"""GSVA's referring-segmentation samples: multi-target training draws and one-prompt-per-image validation.

Templates come from `processing_gsva` (never redefined here). Training follows GSVA `data/refer_seg_dataset.py`:
a sub-dataset and an image uniformly, up to `num_classes_per_sample` sentences of the image's train refs without
replacement, `[REJ]` for empty masks, redraw when every drawn target is `[REJ]`. Unlike GSVA, which draws from the
global RNG, each draw is a pure function of `(seed, index)`, so `dataset[i]` is reproducible and a resumed run
sees the same samples.
"""

import os
import random

import numpy as np
from torch.utils.data import Dataset

from processing_gsva import clean_sentence, eval_answer, eval_question

from .hf_datasets import load_hf_refer
from .prompts import multi_target_answer, multi_target_question
from .refer import LAYOUTS, ReferDataError, gsva_split_by, load_refer, open_image
from .refer_specs import HF_PREFIX, parse_hf_spec, parse_val_spec
from .sample import Sample
from .seeding import check_index, index_rng
from .specs import parse_dataset_list

DEFAULT_TRAIN_DATASETS = "refclef||refcoco||refcoco+||refcocog"
DEFAULT_SAMPLES_PER_EPOCH = 500 * 8 * 2 * 10  # GSVA's default: steps x batch x grad-accum x GPUs
MAX_DRAWS = 1000


def _train_name(sentence: str) -> str:
    """GSVA training phrase: stripped of whitespace, then of leading/trailing full stops (case kept)."""
    return sentence.strip().strip(".")


class ReferSegDataset(Dataset):
    """GSVA refer_seg training samples (train split of each sub-dataset), `samples_per_epoch` long.

    dataset_dir: GSVA's `--dataset_dir` (holds `refer_seg/`). datasets: `"||"`-joined names, e.g.
    `"refclef||refcoco||refcoco+||refcocog||grefcoco"`; `hf:PATH_OR_REPO` reads the `train` split of a
    `datasets` source (`gsva_hf.data.hf_datasets`), `hf:PATH_OR_REPO|split` another split. image_loader: path or file object → RGB PIL image.
    skip_crowd: leave crowd annotations out of the masks (see `ReferData`).
    samples_per_epoch=None: GSVA's `--no_sampling` fine-tuning mode; exactly one dataset, item i starts from its
    i-th train image (ascending id). An all-`[REJ]` draw is redrawn from a random image (GSVA falls back to
    image 0 there, which would over-weight it).
    """

    def __init__(
        self,
        dataset_dir,
        datasets: str | list[str] = DEFAULT_TRAIN_DATASETS,
        num_classes_per_sample: int = 3,
        samples_per_epoch: int | None = DEFAULT_SAMPLES_PER_EPOCH,
        seed: int = 0,
        image_loader=open_image,
        skip_crowd: bool = False,
    ):
        if num_classes_per_sample < 1:
            raise ValueError(f"num_classes_per_sample must be >= 1, got {num_classes_per_sample}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 (or None to iterate images), got {samples_per_epoch}")
        self.refer_seg_dir = os.path.join(os.fspath(dataset_dir), "refer_seg")
        self.names = parse_dataset_list(datasets, LAYOUTS, "refer dataset", prefixes=(HF_PREFIX,))
        if samples_per_epoch is None and len(self.names) != 1:
            raise ValueError(f"samples_per_epoch=None iterates the images of exactly one dataset, got {self.names}")
        self.num_classes_per_sample = int(num_classes_per_sample)
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.seed = int(seed)
        self.image_loader = image_loader
        self.splits = {
            name: parse_hf_spec(name)[1] if name.startswith(HF_PREFIX) and "|" in name else "train"
            for name in self.names
        }
        self.data = {
            name: load_hf_refer(name[len(HF_PREFIX):].rsplit("|", 1)[0], self.splits[name])
            if name.startswith(HF_PREFIX)
            else load_refer(self.refer_seg_dir, name, gsva_split_by(name), skip_crowd=skip_crowd)
            for name in self.names
        }
        self.image_ids = {name: self.data[name].image_ids(self.splits[name]) for name in self.names}

    def __len__(self) -> int:
        if self.samples_per_epoch is None:
            return len(self.image_ids[self.names[0]])
        return self.samples_per_epoch

    def rng(self, index: int) -> random.Random:
        """The generator of sample `index`: a function of (seed, index) only."""
        return index_rng(self.seed, index, "refer_seg")

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        first_image = self.image_ids[self.names[0]][index] if self.samples_per_epoch is None else None
        return self.draw(self.rng(index), index, first_image)

    def draw(self, rng: random.Random, index: int | None = None, first_image: int | None = None) -> Sample:
        """One training sample drawn with `rng` (a mixing dataset can pass its own per-index generator).

        first_image: try this image (of the first dataset) before drawing random ones.
        """
        for attempt in range(MAX_DRAWS):
            if attempt == 0 and first_image is not None:
                name, image_id = self.names[0], first_image
            else:
                name = rng.choice(self.names)
                image_id = rng.choice(self.image_ids[name])
            data = self.data[name]
            split = self.splits[name]
            pool = [(ref, sentence) for ref in data.refs_of_image(image_id, split) for sentence in ref.sentences]
            if len(pool) >= self.num_classes_per_sample:
                chosen = rng.sample(pool, self.num_classes_per_sample)
            else:
                chosen = pool
            if not chosen or all(ref.no_target for ref, _ in chosen):
                continue
            masks = [data.ref_mask(ref) for ref, _ in chosen]
            rejected = [bool(mask.sum() < 1) for mask in masks]
            if all(rejected):
                continue
            names = [_train_name(sentence.sent) for _, sentence in chosen]
            question = multi_target_question(names, rng=rng)
            answer = multi_target_answer(names, rejected, rng=rng, separator=", ")
            info = data.images[image_id]
            return Sample(
                image=data.load_image(image_id, self.image_loader),
                rounds=[(question, answer)],
                masks=np.stack(masks),
                targets=names,
                rejected=rejected,
                image_path=info.path,
                source=f"refer_seg/{name}",
                meta={
                    "dataset": name,
                    "split": split,
                    "index": index,
                    "image_id": image_id,
                    "ref_ids": [ref.ref_id for ref, _ in chosen],
                    "sent_ids": [sentence.sent_id for _, sentence in chosen],
                },
            )
        which = "a drawn sample" if index is None else f"sample {index}"
        raise ReferDataError(
            f"{which}: {MAX_DRAWS} draws from {self.names} gave only [REJ] targets; their train refs have "
            "(almost) no non-empty masks"
        )


class ReferSegValDataset(Dataset):
    """GSVA validation: one sample per image of the split, every sentence of every ref of it in one prompt.

    Question/answer are GSVA's verbatim (`eval_question` / `eval_answer`, quirks included), sentences cleaned by
    `clean_sentence`; one mask per sentence (its ref's union, all-zero and `[REJ]` for a no-target ref).

    spec `"hf:PATH_OR_REPO|split"` reads a `datasets` source instead (`dataset_dir` is not used); `spec` then
    becomes `"<its dataset column>|hf|<split>"`, which picks the metrics, and `origin` keeps what was asked.
    """

    def __init__(self, dataset_dir, spec: str = "grefcoco|unc|val", image_loader=open_image, skip_crowd=False):
        self.image_loader = image_loader
        self.origin = spec
        if spec.startswith(HF_PREFIX):
            source, self.split = parse_hf_spec(spec)
            self.data = load_hf_refer(source, self.split)
            self.dataset, self.split_by = self.data.name, "hf"
            self.spec = f"{self.dataset}|hf|{self.split}"
        else:
            if dataset_dir is None:
                raise ValueError(f"val dataset {spec!r} is read from a data tree; give its dataset_dir")
            self.spec = spec
            self.dataset, self.split_by, self.split = parse_val_spec(spec)
            refer_seg_dir = os.path.join(os.fspath(dataset_dir), "refer_seg")
            self.data = load_refer(refer_seg_dir, self.dataset, self.split_by, skip_crowd=skip_crowd)
            self.origin = f"refer_seg/{self.dataset}|{self.split_by}|{self.split}"
        self.image_ids = self.data.image_ids(self.split)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        index = check_index(index, len(self))
        image_id = self.image_ids[index]
        pairs = [(ref, sentence) for ref in self.data.refs_of_image(image_id, self.split) for sentence in ref.sentences]
        if not pairs:
            raise ReferDataError(
                f"{self.data.refs_path}: image {image_id} of split {self.split} has refs but no sentences"
            )
        ref_masks = {}
        for ref, _ in pairs:
            if id(ref) not in ref_masks:
                ref_masks[id(ref)] = self.data.ref_mask(ref)
        info = self.data.images[image_id]
        masks = np.stack([ref_masks[id(ref)] for ref, _ in pairs])
        sentences = [clean_sentence(sentence.sent) for _, sentence in pairs]
        rejected = [bool(mask.sum() < 1) for mask in masks]
        return Sample(
            image=self.data.load_image(image_id, self.image_loader),
            rounds=[(eval_question(sentences), eval_answer(sentences, rejected))],
            masks=masks,
            targets=sentences,
            rejected=rejected,
            image_path=info.path,
            source=self.origin,
            meta={
                "dataset": self.dataset,
                "split": self.split,
                "index": index,
                "image_id": image_id,
                "ref_ids": [ref.ref_id for ref, _ in pairs],
                "sent_ids": [sentence.sent_id for _, sentence in pairs],
                "no_target": [ref.no_target for ref, _ in pairs],
            },
        )


__all__ = ["ReferSegDataset", "ReferSegValDataset", "parse_val_spec"]
