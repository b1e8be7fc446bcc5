"""Secret: a value that never shows itself.

Device codes, PKCE verifiers and tokens travel inside a `Secret`. It is deliberately *not* a `str`
subclass: a `str` subclass leaks through `json.dumps`, `format`, `%` and concatenation. `str`, `repr`,
`format`, JSON encoding, `pickle` and `copy` all refuse or redact; `reveal()` is the only way out.
"""

from __future__ import annotations

from typing import Any, Generic, NoReturn, TypeVar

T = TypeVar("T")

REDACTED = "[redacted]"


class Secret(Generic[T]):
    """Holds a sensitive value; every way of printing it prints `[redacted]`."""

    __slots__ = ("_value",)
    _value: T

    def __init__(self, value: T) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> T:
        """The value itself: call only where it must leave the process (a request body, a file)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        # Equality by identity only: comparing secrets is a timing side channel waiting to happen.
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret[T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret[T]:
        return self

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")
