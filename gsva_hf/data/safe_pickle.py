"""Load the refer-family pickles (`refs(unc).p`, `grefs(unc).p`) without executing anything they name.

`pickle.load` on a downloaded file runs whatever callable the file names. These files only ever hold lists of
dicts of strings and numbers, so the unpickler here refuses every global lookup (the one way a pickle reaches code)
and then checks that the result is built from plain containers and scalars only.
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


def _is_plain(value) -> bool:
    """Fast iterative walk: True when every node is of an `ALLOWED_TYPES` type."""
    allowed, stack = set(ALLOWED_TYPES), [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind not in allowed:
            return False
        if kind is dict:
            if not all(type(key) in allowed for key in item):
                return False
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
    return True


def _check_plain(value, source: str) -> None:
    """Refuse any type outside `ALLOWED_TYPES` (sets, bytearrays, ...), naming where it sits in the data."""
    if _is_plain(value):
        return
    stack = [(value, "<root>")]
    while stack:
        item, where = stack.pop()
        kind = type(item)
        if kind not in ALLOWED_TYPES:
            raise UnsafePickleError(f"{source}: refused object of type {kind.__name__} at {where}")
        if kind is dict:
            for key, child in item.items():
                if type(key) not in ALLOWED_TYPES:
                    raise UnsafePickleError(f"{source}: refused dict key of type {type(key).__name__} at {where}")
                stack.append((child, f"{where}[{key!r}]"))
        elif kind is list or kind is tuple:
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))


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
        _check_plain(value, source)
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
