"""Values checked against simple type annotations, as configs give them (scalars, None, Literal, unions)."""

import types
import typing
from typing import Any, Literal, Union


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint``: ``Any``, None, ``Literal[...]``, unions, classes; a generic
    container (``list[str]``) is checked as its container only. ``bool`` is no ``int``; an ``int`` is a
    ``float``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin is Union or origin is types.UnionType:
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The ``Literal`` choices within ``hint`` (also inside a union); empty if there are none."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return tuple(choice for arg in typing.get_args(hint) for choice in literal_choices(arg))
    return ()


def type_text(hint: Any) -> str:
    """``hint`` as a config reader writes it: ``int | None``, ``'default' | 'zeros'``, ``list[str]``."""
    origin = typing.get_origin(hint)
    if hint is None or hint is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(hint))
    if origin is Union or origin is types.UnionType:
        return " | ".join(type_text(arg) for arg in typing.get_args(hint))
    if isinstance(hint, type) and origin is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_value(name: str, value: Any, hint: Any, owner: str) -> None:
    """Raise unless ``value`` matches ``hint``: ``ValueError`` for a scalar outside ``hint``'s
    ``Literal`` choices, else ``TypeError``; the message names ``name`` and ``owner`` and says what
    was expected, e.g. ``init: conv kind 'refconv' expects 'default' | 'zeros', got 'ones'``."""
    if matches(value, hint):
        return
    scalar = isinstance(value, (bool, int, float, str))
    error = ValueError if scalar and literal_choices(hint) else TypeError
    raise error(f"{name}: {owner} expects {type_text(hint)}, got {value!r}")
