"""GSVA's `"a||b||c"` list syntax for dataset names, parsed and checked in one place."""


def parse_dataset_list(spec: str | list[str] | tuple[str, ...], known, what: str, prefixes=()) -> list[str]:
    """`"a||b||c"` (or a list) → names, each checked against `known` (or starting with one of `prefixes`, e.g.
    `hf:` for a datasets source); empty entries and repeats are refused."""
    names = spec.split("||") if isinstance(spec, str) else list(spec)
    names = [name.strip() if isinstance(name, str) else name for name in names]
    if not names or any(not name for name in names):
        raise ValueError(f"{what} list {spec!r} is empty or has an empty entry")
    unknown = [name for name in names if name not in known and not str(name).startswith(tuple(prefixes))]
    if unknown:
        raise ValueError(f"unknown {what} {unknown} in {spec!r}; known: {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} list {spec!r} names a dataset twice")
    return names
