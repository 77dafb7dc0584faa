"""Per-item random generators, so `dataset[i]` is a pure function of (seed, i) and training resumes exactly."""

import random


def index_rng(seed: int, index: int, salt: str) -> random.Random:
    """A `random.Random` seeded from (seed, index, salt).

    A string seed is hashed with SHA-512 by `random.Random`, so the stream does not depend on PYTHONHASHSEED,
    the worker process or how many items were drawn before. `salt` keeps the streams of different readers
    (and of the mixing choice) independent for the same (seed, index).
    """
    return random.Random(f"gsva:{int(seed)}:{int(index)}:{salt}")


def check_index(index: int, length: int) -> int:
    """Python-style index into `range(length)`, or IndexError (which also ends plain iteration over a dataset)."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index
