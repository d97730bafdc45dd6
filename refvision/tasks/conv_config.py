"""``model.conv``: which convs a task converts, to which method, with which of its declared options."""

import typing
from typing import Any, Literal, TypedDict

from refvision.nn import ConvMethod, get_method, method_name
from refvision.utils.type_check import check_value


class ConvSelection(TypedDict, total=False):
    """The keys of ``model.conv`` that every method shares: which convs become what (see
    ``refvision.surgery.convert``).

    ``kind`` is ``none``, a registered method (``refvision.nn.registered_methods()``) or the class
    path of a :class:`~refvision.nn.ConvMethod`.
    """

    kind: str
    select: Literal["depthwise", "kxk", "pointwise", "all"]
    include: list[str] | None
    exclude: list[str] | None


ConvConfig = dict[str, Any]
"""``model.conv``: the :class:`ConvSelection` keys and, beside them, the options the method declares
(``ConvMethod.options()``), e.g. ``{kind: refconv, select: kxk, map_k: 3, init: default}``; checked
by :func:`conv_method`. The options may also sit under ``options`` (``{kind: ..., options: {...}}``,
as refvision 0.1.0 wrote them for methods given by class path)."""


def conv_method(conv: ConvConfig) -> tuple[type[ConvMethod], dict[str, Any]]:
    """The method ``conv["kind"]`` names (not ``none``) and its options, checked against
    :class:`ConvSelection` and the method's declared options.

    Raises:
        ValueError: a kind that names no method, a selection key of another type, an option the
            method does not declare, of another type or outside its choices, or one given twice
            (flat and under ``options``); the message names the ``model.conv`` key, the method and
            what it takes.
    """
    for key, hint in typing.get_type_hints(ConvSelection).items():
        if key in conv:
            try:
                check_value(f"model.conv.{key}", conv[key], hint, "the conv selection")
            except (TypeError, ValueError) as err:
                raise ValueError(str(err)) from None
    try:
        method = get_method(conv["kind"])
    except ValueError as err:
        raise ValueError(f"model.conv.kind: {err}; or none to keep the model as built") from None
    nested = conv.get("options") or {}
    if not isinstance(nested, dict):
        raise ValueError(f"model.conv.options: expected a mapping of option names to values, got {nested!r}")
    flat = {key: value for key, value in conv.items() if key not in _SELECTION_KEYS and key != "options"}
    twice = sorted(set(flat) & set(nested))
    if twice:
        raise ValueError(f"model.conv: {', '.join(twice)} given both beside kind and under options; give each once")
    try:
        declared = method.options()
    except TypeError as err:
        raise ValueError(f"model.conv.kind: {err}") from None
    taken = sorted(set(declared) & {*_SELECTION_KEYS, "options"})
    if taken:
        raise ValueError(
            f"model.conv.kind: {method_name(method)!r} declares option(s) {', '.join(taken)}, which model.conv "
            "uses itself; rename them in its from_conv"
        )
    try:
        return method, method.check_options({**flat, **nested})
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.conv.{err}") from None


_SELECTION_KEYS = frozenset(ConvSelection.__annotations__)
