"""Read the JSON files of a checkpoint folder (config, weight index, tokenizer side files) with clear errors:
:func:`read_json` for the file, :class:`JsonFields` for typed, range-checked values of one object in it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import CheckpointError, file_error

# The largest JSON file of a release is tokenizer.json (4.7 MB); anything far bigger is not a side file.
MAX_JSON_BYTES = 64 << 20


def kind(value: object) -> str:
    """The JSON name of ``value``'s type, for messages ("a list", "a string", ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_json(path: Path, expect: type = dict) -> Any:
    """The parsed content of ``path``, whose top level must be an ``expect`` (a JSON object by default).

    Raises :class:`CheckpointError` naming the file when it cannot be read, is larger than
    :data:`MAX_JSON_BYTES`, is not UTF-8, is not JSON, is nested too deeply or has another top-level type.
    """
    fix = "Re-download the checkpoint (or restore this file from the release)."
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {size} bytes, too large for a checkpoint's JSON file. {fix}")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}). {fix}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}). {fix}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path} is nested too deeply to be a checkpoint's JSON file. {fix}") from exc
    except OSError as exc:
        raise file_error(exc, str(path)) from exc
    if not isinstance(value, expect):
        raise CheckpointError(f"{path} holds {kind(value)} where {kind(expect())} was expected. {fix}")
    return value


def show(value: object) -> str:
    """``repr(value)`` cut to 60 characters, for messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_REQUIRED = object()


class JsonFields:
    """Typed, range-checked reads from one object of a JSON file; every error names the file and the key.

    ``name`` is the object's dotted path in the file ("" for the top level). A key that is absent or
    ``null`` takes its default (as transformers' configs do); without a default it is an error.
    """

    def __init__(self, file: str, name: str, values: object):
        if not isinstance(values, dict):
            raise CheckpointError(f"{file}: '{name}' must be a JSON object, found {kind(values)}. "
                                  f"{self.fix_for(file)}")
        self.file, self.name, self.values = file, name, values

    @staticmethod
    def fix_for(file: str) -> str:
        return f"Fix {Path(file).name} or re-download the checkpoint."

    def path(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def fail(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {self.path(key)} {why}. {self.fix_for(self.file)}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.values.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(key, "is missing")
            return default
        return value

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def sub(self, key: str, default: Any = _REQUIRED) -> JsonFields:
        """The object under ``key``."""
        return JsonFields(self.file, self.path(key), self.get(key, default))

    def integer(self, key: str, low: int, high: int, default: Any = _REQUIRED) -> int:
        """An integer (not a boolean) in ``low..high``."""
        return self._integer(key, self.get(key, default), low, high)

    def integers(self, key: str, low: int, high: int, max_len: int, default: Any = _REQUIRED) -> tuple[int, ...]:
        """A non-empty list of at most ``max_len`` integers in ``low..high``."""
        value = self.get(key, default)
        if not isinstance(value, list | tuple) or not 1 <= len(value) <= max_len:
            raise self.fail(key, f"must be a list of 1 to {max_len} integers, found {show(value)}")
        return tuple(self._integer(f"{key}[{i}]", v, low, high) for i, v in enumerate(value))

    def number(self, key: str, low: float, high: float, default: Any = _REQUIRED, *, open_low: bool = True
               ) -> float:
        """A finite number in ``(low, high]`` (``[low, high]`` when not ``open_low``)."""
        return self._number(key, self.get(key, default), low, high, open_low)

    def numbers(self, key: str, low: float, high: float, length: int, default: Any = _REQUIRED, *,
                open_low: bool = True) -> tuple[float, ...]:
        """A list of exactly ``length`` numbers, each as :meth:`number` checks it."""
        value = self.get(key, default)
        if not isinstance(value, list | tuple) or len(value) != length:
            raise self.fail(key, f"must be a list of {length} numbers, found {show(value)}")
        return tuple(self._number(f"{key}[{i}]", v, low, high, open_low) for i, v in enumerate(value))

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, found {show(value)}")
        return value

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, found {show(value)}")
        return value

    def _integer(self, key: str, value: object, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, found {show(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"= {value} is outside the plausible range {low}..{high}")
        return value

    def _number(self, key: str, value: object, low: float, high: float, open_low: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(key, f"must be a number, found {show(value)}")
        if not (low < value if open_low else low <= value) or value > high:
            bounds = f"{'(' if open_low else '['}{low}, {high}]"
            raise self.fail(key, f"= {value} is outside the plausible range {bounds}")
        return float(value)
