"""How a referring split is named: `"grefcoco|unc|val"` in a GSVA data tree, `"hf:PATH_OR_REPO|val"` in a
`datasets` source. Below both readers (`refer_seg` builds samples, `hf_datasets` reads and writes the `datasets`
form), so neither imports the other to parse a name.
"""

from .refer import LAYOUTS, gsva_split_by

HF_PREFIX = "hf:"


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """`"hf:PATH_OR_REPO|split"` → (PATH_OR_REPO, split)."""
    if not spec.startswith(HF_PREFIX) or "|" not in spec:
        raise ValueError(f"a datasets source must look like 'hf:PATH_OR_REPO|split', got {spec!r}")
    source, split = spec[len(HF_PREFIX):].rsplit("|", 1)
    if not source or not split:
        raise ValueError(f"a datasets source must look like 'hf:PATH_OR_REPO|split', got {spec!r}")
    return source, split


def parse_val_spec(spec: str) -> tuple[str, str, str]:
    """`"<dataset>|<splitBy>|<split>"` → (dataset, GSVA's splitBy, split); the given splitBy is overridden, as GSVA
    does (umd for refcocog, unc otherwise)."""
    parts = spec.split("|")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"refer val spec must look like 'grefcoco|unc|val', got {spec!r}")
    dataset, _, split = parts
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown refer dataset {dataset!r} in {spec!r}; known: {', '.join(sorted(LAYOUTS))}")
    return dataset, gsva_split_by(dataset), split


__all__ = ["HF_PREFIX", "parse_hf_spec", "parse_val_spec"]
