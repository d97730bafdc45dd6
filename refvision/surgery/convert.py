"""Swap a model's convolutions for a conv method, and fold them back for deployment.

``convert`` edits any ``nn.Module`` in place (no model code changes) and records what it
replaced on the model; ``reparameterize`` turns every converted layer into its inference
form (``ConvMethod.fuse``: a plain ``nn.Conv2d`` for RefConv) and folds timm's
re-parameterizable blocks (MobileOne, RepVGG, FastViT) the way timm does.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from refvision.nn import ConvMethod, get_method, method_name
from refvision.utils.text_table import render_table

logger = logging.getLogger("refvision")

SELECTIONS: dict[str, Callable[[nn.Conv2d], bool]] = {
    "depthwise": lambda c: c.groups == c.in_channels > 1,
    "kxk": lambda c: max(c.kernel_size) > 1,
    "pointwise": lambda c: tuple(c.kernel_size) == (1, 1) and c.groups == 1,
    "all": lambda c: True,
}

# A plain attribute (not a buffer): copied by deepcopy, absent from state_dict.
_REPORT_ATTR = "_refvision_replacements"


@dataclass(frozen=True)
class Replacement:
    """One conv that ``convert`` replaced: its qualified name, the new kind, its geometry."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    dilation: tuple[int, int]


def convert(
    model: nn.Module,
    kind: str | type[ConvMethod],
    *,
    select: str = "kxk",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    **options: object,
) -> nn.Module:
    """Replace the selected ``nn.Conv2d`` layers of ``model`` by ``kind`` (in place).

    Args:
        model: any module; its convs are found by walking the module tree (Sequential
            indices, ModuleDict keys and attributes alike).
        kind: a registered method (``"refconv"``, ``"drconv"``, ``"acconv"``, see
            ``refvision.nn.registered_methods``), a ``module.ClassName`` path of a
            :class:`~refvision.nn.ConvMethod` subclass, or the class itself; the new layer is
            ``cls.from_conv(conv, **options)``.
        select: ``"depthwise"`` (``groups == in_channels > 1``), ``"kxk"`` (a kernel
            side > 1, any groups), ``"pointwise"`` (1x1, ``groups == 1``) or ``"all"``.
        include: glob pattern(s) on qualified names (``"features.3.conv.*"``); keep only matches.
        exclude: glob pattern(s); drop matches.
        options: the method's options (``cls.options()``: the typed keyword-only parameters of
            its ``from_conv``), checked against their declared types.

    Candidates are convs of exactly type ``nn.Conv2d`` that the method ``accepts`` (DRConv:
    ``groups == 1``): subclasses (already converted layers, ``timm``'s ``Conv2dSame`` /
    ``StdConv2d``, ...) change the forward pass and are neither replaced nor descended into,
    so converting twice never nests. A selected conv whose kernel holds NaN or inf is refused.
    Each new layer keeps its conv's train/eval mode. Either all selected layers are replaced
    or, on error, none.

    Returns:
        ``model`` itself. ``conversion_report(model)`` lists what was replaced.

    Raises:
        ValueError: unknown ``kind`` / ``select``, nothing matched (a second ``convert``
            with the same selection matches nothing new and raises), or a selected conv the
            method cannot take (non-finite or, for RefConv, all-zero kernel; named in the message),
            or an option value outside its declared choices.
        TypeError: an option the method does not declare, or a value of another type.
    """
    cls = kind if isinstance(kind, type) else get_method(kind)
    if not issubclass(cls, ConvMethod):
        raise ValueError(f"convert: {cls!r} is not a refvision.nn.ConvMethod subclass")
    kind = method_name(cls)
    if select not in SELECTIONS:
        raise ValueError(f"convert: unknown select {select!r}; allowed: {', '.join(SELECTIONS)}")
    try:
        options = cls.check_options(options)
    except (TypeError, ValueError) as err:
        raise type(err)(f"convert(kind={kind!r}): {err}") from None
    includes, excludes = _patterns(include), _patterns(exclude)

    def wanted(name: str, conv: nn.Conv2d) -> bool:
        return (
            type(conv) is nn.Conv2d
            and SELECTIONS[select](conv)
            and cls.accepts(conv)
            and (not includes or any(fnmatch.fnmatchcase(name, p) for p in includes))
            and not any(fnmatch.fnmatchcase(name, p) for p in excludes)
        )

    sites = [site for site in _conv_sites(model) if wanted(site[0], site[3])]
    if not sites:
        raise ValueError(
            f"convert: nothing matched kind={kind!r}, select={select!r}, include={include!r}, "
            f"exclude={exclude!r}; {_census(model)}"
        )

    new_layers: dict[int, nn.Conv2d] = {}  # by id: a conv shared by two parents stays shared
    records = []
    for name, _, _, conv in sites:
        if id(conv) not in new_layers:
            if not bool(conv.weight.detach().isfinite().all()):
                raise ValueError(
                    f"convert: cannot convert {name!r} ({conv}) to {kind}: its weight holds NaN or inf; "
                    "the basis must be a trained, finite kernel (check the checkpoint loaded before converting)"
                )
            try:
                new_layers[id(conv)] = cls.from_conv(conv, **options).train(conv.training)
            except ValueError as err:
                raise ValueError(f"convert: cannot convert {name!r} ({conv}) to {kind}: {err}") from err
        records.append(
            Replacement(
                name,
                kind,
                conv.in_channels,
                conv.out_channels,
                tuple(conv.kernel_size),
                tuple(conv.stride),
                conv.groups,
                tuple(conv.dilation),
            )
        )
    for _, parent, attr, conv in sites:
        setattr(parent, attr, new_layers[id(conv)])

    setattr(model, _REPORT_ATTR, [*conversion_report(model), *records])
    logger.info(
        "convert: %d conv(s) -> %s (select=%s, include=%r, exclude=%r, options=%r)",
        len(records),
        kind,
        select,
        include,
        exclude,
        options,
    )
    return model


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inference form of ``model``: every conv method replaced by its ``fuse()``.

    timm's re-parameterizable blocks are folded too, by the rule of
    ``timm.utils.reparameterize_model``: a module with ``fuse`` is replaced by what it returns,
    one with ``reparameterize`` or ``switch_to_deploy`` is switched in place -- but children
    before their parent (timm goes parent first), so that a block folding its branch convs
    reads the effective kernels of conv methods inside them. Works on a deep
    copy unless ``inplace`` (a root module that is itself foldable is always returned as a new
    module). For a model converted with a method that ``folds_to_conv`` (RefConv, ACConv), the
    result's ``state_dict`` has exactly the keys and shapes of the original architecture, so the
    vanilla model class loads it with ``strict=True``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, ConvMethod):
        return model.fuse()
    fused: dict[int, nn.Module] = {}  # by id: a module shared by two parents stays shared

    def fold(module: nn.Module) -> None:
        # Children first: a timm block folds the kernels of its branch convs, so a conv method
        # inside a branch must already be a plain conv holding its effective kernel.
        for attr, child in list(module._modules.items()):
            if child is None:
                continue
            if not isinstance(child, ConvMethod):
                fold(child)
            if isinstance(child, ConvMethod) or callable(getattr(child, "fuse", None)):
                if id(child) not in fused:
                    fused[id(child)] = child.fuse()
                setattr(module, attr, fused[id(child)])
                continue
            for switch in ("reparameterize", "switch_to_deploy"):
                if callable(getattr(child, switch, None)):
                    getattr(child, switch)()
                    break

    fold(model)
    return model


def converted_layers(model: nn.Module) -> list[tuple[str, ConvMethod]]:
    """``(qualified name, layer)`` of every conv-method layer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConvMethod)]


def conversion_report(model: nn.Module) -> list[Replacement]:
    """What ``convert`` replaced in ``model``, in order, over all calls.

    A history, not a census: it survives ``copy.deepcopy`` and so also stays on the
    copy ``reparameterize`` returns, where those layers are plain again.
    """
    return list(getattr(model, _REPORT_ATTR, []))


def format_report(replacements: Sequence[Replacement]) -> str:
    """``replacements`` as an aligned text table, one row per layer."""
    header = ("name", "kind", "in", "out", "kernel", "stride", "groups", "dilation")
    rows = [
        (
            r.name,
            r.kind,
            str(r.in_channels),
            str(r.out_channels),
            _dims(r.kernel_size),
            _dims(r.stride),
            str(r.groups),
            _dims(r.dilation),
        )
        for r in replacements
    ]
    return render_table(header, rows)


def _conv_sites(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, nn.Conv2d]]:
    """(qualified name, parent, attribute in parent, conv) for every Conv2d; convs are leaves.

    Reads ``_modules`` rather than ``named_children()``, which would skip the second
    attribute holding a shared module.
    """
    for attr, child in module._modules.items():
        name = f"{prefix}.{attr}" if prefix else attr
        if child is None:
            continue
        if isinstance(child, nn.Conv2d):
            yield name, module, attr, child
        else:
            yield from _conv_sites(child, name)


def _census(model: nn.Module) -> str:
    counts: Counter[str] = Counter()
    for _, _, _, conv in _conv_sites(model):
        if type(conv) is not nn.Conv2d:
            counts["converted" if isinstance(conv, ConvMethod) else "subclass"] += 1
            continue
        for sel in ("kxk", "pointwise", "depthwise"):
            counts[sel] += SELECTIONS[sel](conv)
    return (
        f"model has {counts['kxk']} kxk, {counts['pointwise']} pointwise, "
        f"{counts['depthwise']} depthwise plain convs, {counts['converted']} already "
        f"converted, {counts['subclass']} other Conv2d subclasses (left alone)"
    )


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _dims(value: tuple[int, ...]) -> str:
    return "x".join(map(str, value))
