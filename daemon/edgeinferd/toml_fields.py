"""Typed reads from a parsed TOML table, with errors that name the file and field.

Config files are validated once, at load; every reader below either returns a
value of the promised type or raises ConfigError saying where and what.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edgeinferd.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning I/O and syntax errors into ConfigError."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except OSError as error:
        raise ConfigError(str(path), "", f"cannot be read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), "", f"invalid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            str(path), "", f"is not UTF-8 text (byte {error.start} cannot be decoded)"
        ) from None


class Table:
    """A TOML table being validated; remembers which keys were read.

    ``finish()`` refuses keys nobody read, so a misspelled setting is an error
    rather than silently ignored.
    """

    def __init__(self, data: dict[str, Any], file: str, prefix: str = "") -> None:
        self.data = data
        self.file = file
        self.prefix = prefix
        self._seen: set[str] = set()

    def field(self, key: str) -> str:
        """The dotted name of a key, as error messages show it."""
        return f"{self.prefix}{key}"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.field(key), problem)

    def _get(self, key: str, kinds: tuple[type, ...], expected: str, default: Any) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, f"missing; expected {expected}")
            return default
        value = self.data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(key, f"expected {expected}, got {value!r}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, (str,), "a string", default)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, (bool,), "true or false", default)

    def integer(
        self,
        key: str,
        default: Any = _MISSING,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        bounds = _bounds(minimum, maximum)
        value = self._get(key, (int,), f"an integer{bounds}", default)
        if value is not None and value is not default:
            _check_range(self, key, value, minimum, maximum, f"an integer{bounds}")
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> Any:
        bounds = _bounds(minimum, maximum)
        value = self._get(key, (int, float), f"a number{bounds}", default)
        if value is not None and value is not default:
            _check_range(self, key, value, minimum, maximum, f"a number{bounds}")
            value = float(value)
        return value

    def choice(self, key: str, choices: Sequence[str], default: Any = _MISSING) -> Any:
        expected = "one of " + ", ".join(repr(c) for c in choices)
        value = self._get(key, (str,), expected, default)
        if value is not default and value not in choices:
            raise self.error(key, f"expected {expected}, got {value!r}")
        return value

    def list_of(self, key: str, item: Callable[[Any, str], T], default: Any = _MISSING) -> Any:
        """A list whose items are checked by ``item(value, field_name)``."""
        value = self._get(key, (list,), "a list", default)
        if value is default:
            return value
        return [item(v, f"{self.field(key)}[{i}]") for i, v in enumerate(value)]

    def table(self, key: str, required: bool = False) -> Table:
        value = self._get(key, (dict,), "a table", _MISSING if required else {})
        return Table(value, self.file, f"{self.field(key)}.")

    def tables(self, key: str) -> list[Table]:
        """An array of tables ([[key]])."""
        value = self._get(key, (list,), "an array of tables", [])
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{key}[{index}]", f"expected a table, got {item!r}")
            result.append(Table(item, self.file, f"{self.field(key)}[{index}]."))
        return result

    def finish(self) -> None:
        """Refuse keys that no reader asked for (typos, unsupported settings)."""
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown setting")


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _check_range(
    table: Table,
    key: str,
    value: float,
    minimum: float | None,
    maximum: float | None,
    expected: str,
) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise table.error(key, f"expected {expected}, got {value!r}")
