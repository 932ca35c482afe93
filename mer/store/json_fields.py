"""Typed reading of a parsed JSON document, with errors naming the field's path (`layers[1].format.d_ff`).

`JsonObject(data, "geometry")` wraps a dict; `.integer("d_model")`, `.text(...)`, `.object(...)`,
`.array(...)` return the field if it has the right type (an integer is a JSON integer: not a bool,
not a float) and raise `FieldError` naming the path, the value and what was expected otherwise.
"""

from __future__ import annotations

from typing import Any

MAX_SHOWN = 60  # characters of a bad value quoted in an error


class FieldError(ValueError):
    """A missing field or a field of the wrong type or range (the message names its path)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class JsonObject:
    """A JSON object (dict) at `path` in its document."""

    def __init__(self, data: Any, path: str = ""):
        if not isinstance(data, dict):
            raise FieldError(f"{path or 'the document'} is {_shown(data)}, expected a JSON object")
        self.data, self.path = data, path

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise FieldError(f"{_join(self.path, key)} is missing")
        return self.data[key]

    def integer(self, key: str, minimum: int = 0) -> int:
        return checked_integer(self.get(key), _join(self.path, key), minimum)

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if not isinstance(value, str):
            raise FieldError(f"{_join(self.path, key)} is {_shown(value)}, expected a string")
        return value

    def object(self, key: str) -> "JsonObject":
        return JsonObject(self.get(key), _join(self.path, key))

    def array(self, key: str, default: list | None = None) -> list:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if not isinstance(value, list):
            raise FieldError(f"{_join(self.path, key)} is {_shown(value)}, expected a list")
        return value

    def objects(self, key: str, default: list | None = None) -> list["JsonObject"]:
        """The list at `key`, each item a JSON object."""
        path = _join(self.path, key)
        return [JsonObject(item, f"{path}[{index}]") for index, item in enumerate(self.array(key, default))]


def checked_integer(value: Any, path: str, minimum: int = 0) -> int:
    """`value` if it is a JSON integer >= minimum, else FieldError naming `path`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldError(f"{path} is {_shown(value)}, expected an integer >= {minimum}")
    return value


def checked_text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise FieldError(f"{path} is {_shown(value)}, expected a string")
    return value
