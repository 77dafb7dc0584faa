"""GSVA's training mixture of dataset types, and the validation-set dispatcher for `--val_dataset` specs."""

from pathlib import Path
from typing import Callable

import torch

from .reason_seg import ReasonSegDataset, ReasonSegValDataset
from .seeding import check_index, index_rng
from .sem_seg import DEFAULT_SEM_SEG_DATA, SemSegDataset
from .specs import parse_dataset_list
from .vqa import VQADataset

DATASET_TYPES = ("sem_seg", "refer_seg", "vqa", "reason_seg")
DEFAULT_DATASETS = "sem_seg||refer_seg||vqa||reason_seg"
DEFAULT_SAMPLE_RATES = "9,3,3,1"
DEFAULT_REFER_SEG_DATA = "refclef||refcoco||refcoco+||refcocog"
DEFAULT_SAMPLES_PER_EPOCH = 500 * 8 * 2 * 10  # GSVA's default: steps x batch x grad-accum x GPUs


def parse_dataset_types(datasets: str | list[str]) -> list[str]:
    """`"sem_seg||refer_seg||vqa||reason_seg"` (or a list) → checked list of dataset types."""
    return parse_dataset_list(datasets, DATASET_TYPES, "dataset type")


def parse_sample_rates(rates: str | list[float], count: int) -> list[float]:
    """`"9,3,3,1"` (or numbers) → probabilities summing to 1, one per dataset type."""
    if isinstance(rates, str):
        try:
            values = [float(piece) for piece in rates.split(",")]
        except ValueError as error:
            raise ValueError(f"sample rates {rates!r} must be comma-separated numbers") from error
    else:
        values = [float(value) for value in rates]
    if len(values) != count:
        raise ValueError(f"{len(values)} sample rates {rates!r} for {count} dataset types")
    if any(value < 0 or value != value for value in values) or sum(values) <= 0:
        raise ValueError(f"sample rates {rates!r} must be non-negative with a positive sum")
    total = sum(values)
    return [value / total for value in values]


class MixedTrainingDataset(torch.utils.data.Dataset):
    """GSVA's `MixedTrainingDataset`: each item picks a dataset type with the normalised sample rates, then
    that type's reader picks a sub-dataset and an image (uniformly, inside the reader).

    Unlike GSVA, whose items ignore the index and use the global RNG, item `i` is a pure function of (seed, i):
    the type comes from a generator seeded with (seed, i), and the type's reader (built `samples_per_epoch` long
    with the same seed) is asked for its own item `i`. So `dataset[i]` is reproducible and resuming at step k
    sees the samples an uninterrupted run would.

    no_sampling=True: GSVA's fine-tuning mode; exactly one dataset type, iterated by index over its images
    (its reader is built with `samples_per_epoch=None`); `sample_rates` is not used. `ReferSegDataset` has no
    such mode (it always samples images), so refer_seg is refused there.

    factories: optional {type: callable(dataset_dir, samples_per_epoch, seed) → dataset} replacing the built-in
    readers (tests, custom data). Other keyword options are passed to the built-in reader of each type.
    """

    def __init__(
        self,
        dataset_dir,
        datasets: str | list[str] = DEFAULT_DATASETS,
        sample_rates: str | list[float] = DEFAULT_SAMPLE_RATES,
        samples_per_epoch: int = DEFAULT_SAMPLES_PER_EPOCH,
        seed: int = 0,
        no_sampling: bool = False,
        num_classes_per_sample: int = 3,
        sem_seg_data: str = DEFAULT_SEM_SEG_DATA,
        refer_seg_data: str = DEFAULT_REFER_SEG_DATA,
        vqa_data: str = "llava_instruct_150k",
        reason_seg_data: str = "ReasonSeg|train",
        explanatory: float | None = 0.1,
        ade20k_classes=None,
        cocostuff_classes=None,
        factories: dict[str, Callable] | None = None,
    ):
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.dataset_dir = Path(dataset_dir)
        self.types = parse_dataset_types(datasets)
        self.no_sampling = bool(no_sampling)
        self.probabilities = [1.0] if self.no_sampling else parse_sample_rates(sample_rates, len(self.types))
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        if self.no_sampling and len(self.types) != 1:
            raise ValueError(f"no_sampling allows exactly one dataset type, got {self.types}")
        if self.no_sampling and "refer_seg" in self.types and not (factories and "refer_seg" in factories):
            raise ValueError("no_sampling is not available for refer_seg: ReferSegDataset always samples images")

        def refer_seg(dataset_dir, samples_per_epoch, seed):
            from .refer_seg import ReferSegDataset

            return ReferSegDataset(
                dataset_dir, datasets=refer_seg_data, num_classes_per_sample=num_classes_per_sample,
                samples_per_epoch=samples_per_epoch, seed=seed,
            )

        builders = {
            "sem_seg": lambda dataset_dir, samples_per_epoch, seed: SemSegDataset(
                dataset_dir, datasets=sem_seg_data, num_classes_per_sample=num_classes_per_sample, seed=seed,
                samples_per_epoch=samples_per_epoch, ade20k_classes=ade20k_classes,
                cocostuff_classes=cocostuff_classes,
            ),
            "refer_seg": refer_seg,
            "vqa": lambda dataset_dir, samples_per_epoch, seed: VQADataset(
                dataset_dir, vqa_data=vqa_data, seed=seed, samples_per_epoch=samples_per_epoch
            ),
            "reason_seg": lambda dataset_dir, samples_per_epoch, seed: ReasonSegDataset.from_spec(
                dataset_dir, reason_seg_data, num_classes_per_sample=num_classes_per_sample,
                explanatory=explanatory, seed=seed, samples_per_epoch=samples_per_epoch,
            ),
        }
        builders.update(factories or {})
        size = None if self.no_sampling else self.samples_per_epoch
        self.datasets = [builders[name](self.dataset_dir, size, self.seed) for name in self.types]
        for name, dataset in zip(self.types, self.datasets):
            if len(dataset) == 0:
                raise ValueError(f"dataset type {name!r} has no items")

    def __len__(self) -> int:
        return len(self.datasets[0]) if self.no_sampling else self.samples_per_epoch

    def dataset_type(self, index: int) -> str:
        """The type item `index` draws from (the same draw `__getitem__` makes)."""
        index = check_index(index, len(self))
        if self.no_sampling:
            return self.types[0]
        draw = index_rng(self.seed, index, "mixed").random()
        cumulative = 0.0
        for name, probability in zip(self.types, self.probabilities):
            cumulative += probability
            if draw < cumulative:
                return name
        return next(name for name, p in reversed(list(zip(self.types, self.probabilities))) if p > 0)

    def __getitem__(self, index: int):
        index = check_index(index, len(self))
        dataset = self.datasets[self.types.index(self.dataset_type(index))]
        return dataset[index % len(dataset)]


def build_val_dataset(dataset_dir, spec: str, **kwargs):
    """A validation set from GSVA's `--val_dataset` syntax.

    `"<name>|<split>"` → ReasonSeg folder split (`ReasonSegValDataset`; kwargs e.g. `ignore_mode`);
    `"<dataset>|<splitBy>|<split>"` (`grefcoco|unc|val`, `refcoco+|unc|testA`, `refcocog|umd|test`) →
    `ReferSegValDataset`, which overrides splitBy as GSVA does. `"hf:PATH_OR_REPO|<split>"` → the same reader
    over a gRefCOCO-style `datasets` source (`gsva_hf.data.hf_datasets`); `dataset_dir` may then be None.
    """
    if spec.startswith("hf:"):
        from .refer_seg import ReferSegValDataset

        return ReferSegValDataset(dataset_dir, spec=spec, **kwargs)
    if dataset_dir is None:
        raise ValueError(f"val dataset {spec!r} is read from a data tree; give its dataset dir (--dataset_dir)")
    parts = spec.split("|")
    if len(parts) == 2:
        return ReasonSegValDataset(dataset_dir, spec=spec, **kwargs)
    if len(parts) == 3:
        from .refer_seg import ReferSegValDataset

        return ReferSegValDataset(dataset_dir, spec=spec, **kwargs)
    raise ValueError(
        f"val dataset spec {spec!r} must be '<name>|<split>' (ReasonSeg) or '<dataset>|<splitBy>|<split>' (refer)"
    )


__all__ = ["MixedTrainingDataset", "build_val_dataset", "parse_dataset_types", "parse_sample_rates"]
