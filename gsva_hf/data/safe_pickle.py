"""Load the refer-family pickles (`refs(unc).p`, `grefs(unc).p`) without executing anything they name.

`pickle.load` on a downloaded file runs whatever callable the file names. These files only ever hold lists of
dicts of strings and numbers, so the unpickler here refuses every global lookup (the one way a pickle reaches code)
and then checks that the result is built from plain containers and scalars only, in one bounded walk: no
container inside itself, no absurd nesting, no shared references standing for far more data than the file holds.
"""

import io
import os
import pickle

ALLOWED_TYPES = (dict, list, tuple, str, bytes, int, float, bool, type(None))


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global (a class or function) or holds a type outside the plain-data whitelist."""


def _latin1_bytes(source: str):
    """Stand-in for `_codecs.encode`: Python 3 writes `bytes` in protocols 0-2 as `encode(str, "latin1")`."""

    def encode(text, encoding="latin1", *rest):
        if rest or not isinstance(text, str) or encoding != "latin1":
            raise UnsafePickleError(
                f"{source}: refused _codecs.encode{(text, encoding, *rest)!r}; only encode(str, 'latin1') "
                "(how Python 3 pickles bytes) is admitted"
            )
        return text.encode("latin1")

    return encode


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` refuses every global except the bytes helper above."""

    def __init__(self, file, source: str, encoding: str):
        super().__init__(file, encoding=encoding, errors="strict")
        self.source = source

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes(self.source)
        raise UnsafePickleError(
            f"{self.source}: refused to load global {module}.{name}; only plain data "
            "(dict, list, tuple, str, bytes, int, float, bool, None) is admitted"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused persistent id {pid!r}; only plain data is admitted")


# A pickle may share one object between several places (its memo). Sharing is kept, but the data read as a tree
# (as every consumer walks it) must stay proportional to the file: chains of shared lists would otherwise make
# a few hundred bytes stand for 2**100 items.
TREE_ITEMS_PER_BYTE = 16
TREE_ITEMS_FLOOR = 100_000
MAX_DEPTH = 100


def _children(item):
    if type(item) is dict:
        return iter(item.items())
    return enumerate(item)


def _check_plain(value, source: str, size: int) -> None:
    """Refuse types outside `ALLOWED_TYPES` (sets, bytearrays, ...), self-containing containers, nesting deeper
    than `MAX_DEPTH`, and sharing that makes the data as a tree larger than `TREE_ITEMS_PER_BYTE` items per file
    byte. Each distinct container is visited once, so the check is linear in the file."""
    allowed = set(ALLOWED_TYPES)
    limit = TREE_ITEMS_PER_BYTE * size + TREE_ITEMS_FLOOR
    finished: dict[int, int] = {}  # id of a checked container -> its item count as a tree
    open_ids: set[int] = set()
    frames: list[list] = []  # [container, children iterator, key being visited, item count so far]

    def where(child: bool = True) -> str:
        """The path to the child being entered (or, child=False, to the innermost open container)."""
        keys = [frame[2] for frame in (frames if child else frames[:-1])]
        shown = "".join(f"[{k!r}]" for k in keys[-8:])
        return f"<root>{'...' if len(keys) > 8 else ''}{shown} (depth {len(keys)})"

    def enter(item) -> int | None:
        kind = type(item)
        if kind not in allowed:
            raise UnsafePickleError(f"{source}: refused object of type {kind.__name__} at {where()}")
        if kind is not dict and kind is not list and kind is not tuple:
            return 1
        if id(item) in finished:
            return finished[id(item)]
        if id(item) in open_ids:
            raise UnsafePickleError(f"{source}: refused a container that contains itself, at {where()}")
        if len(frames) >= MAX_DEPTH:
            raise UnsafePickleError(f"{source}: refused data nested deeper than {MAX_DEPTH} levels, at {where()}")
        if kind is dict:
            for name in item:
                if type(name) not in allowed:
                    raise UnsafePickleError(
                        f"{source}: refused dict key of type {type(name).__name__} at {where()}"
                    )
        open_ids.add(id(item))
        frames.append([item, _children(item), None, 1])
        return None

    enter(value)
    while frames:
        frame = frames[-1]
        step = next(frame[1], None)
        if step is None:
            frames.pop()
            open_ids.discard(id(frame[0]))
            finished[id(frame[0])] = frame[3]
            if not frames:
                break
            frame, count = frames[-1], frame[3]
        else:
            key, child = step
            frame[2] = key
            count = enter(child)
            if count is None:
                continue
        frame[3] += count
        if frame[3] > limit:
            raise UnsafePickleError(
                f"{source}: refused shared references that expand to more than {limit} items "
                f"({TREE_ITEMS_PER_BYTE} per byte of a {size}-byte file), at {where(child=False)}"
            )


def loads_plain(data: bytes, source: str = "<bytes>"):
    """Unpickle plain data from bytes. Python-2 `str` objects are decoded as UTF-8, or latin-1 if that fails."""
    last_error = None
    for encoding in ("utf-8", "latin1"):
        try:
            value = _PlainDataUnpickler(io.BytesIO(data), source, encoding).load()
        except UnicodeDecodeError as error:
            last_error = error
            continue
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            detail = f"{type(error).__name__}: {error}"
            raise pickle.UnpicklingError(f"{source}: not a readable pickle ({detail})") from error
        _check_plain(value, source, len(data))
        return value
    raise pickle.UnpicklingError(f"{source}: cannot decode its strings: {last_error}") from last_error


def load_plain(path) -> object:
    """Unpickle a file that must hold plain data only; errors name the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"pickle file not found: {path}") from error
    return loads_plain(data, source=path)


__all__ = ["ALLOWED_TYPES", "UnsafePickleError", "load_plain", "loads_plain"]
