"""What a conv method is: the protocol every replacement layer answers, and the registry of kinds.

A conv method (RefConv, DRConv, ACConv, or a user's own) is an ``nn.Conv2d`` subclass that
replaces a plain ``nn.Conv2d`` of a trained model while training, and knows how to turn itself
into its inference module. Everything that walks a model -- ``convert``, the trainable regimes,
``profile``, export, deploy checkpoints -- asks the layer through this protocol and never
branches on its type, so a new method is one file plus one ``@register_method`` line.

The fold is called ``fuse()``, the name ``timm.utils.reparameterize_model`` looks for, so timm
folds refvision models as well.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from refvision.utils.class_path import import_class
from refvision.utils.type_check import check_value, type_text

FlopHandle = Callable[[list[Any], list[Any]], int]
"""A FLOP count for one traced op: ``(inputs, outputs) -> multiply-adds``, both lists of the op's
``torch._C.Value``; the handle form of ``fvcore`` / ``mmengine``'s ``FlopAnalyzer.set_op_handle``."""


@dataclass(frozen=True)
class MethodOption:
    """One option a method declares: a typed keyword-only parameter of its ``from_conv``."""

    name: str
    type: Any
    """The resolved annotation (``int``, ``int | None``, ``Literal["a", "b"]``, ...)."""
    default: Any
    """The default value, or ``inspect.Parameter.empty`` for a required option."""

    def __str__(self) -> str:
        text = f"{self.name}: {type_text(self.type)}"
        return text if self.default is inspect.Parameter.empty else f"{text} = {self.default!r}"


class ConvMethod(nn.Conv2d):
    """Base class of the replacement layers.

    A subclass sets :attr:`kind` and implements :meth:`from_conv` and :meth:`fuse`. Being an
    ``nn.Conv2d``, it holds the replaced conv's tensors as ``weight`` (the *basis*: the trained
    kernel, a parameter or a frozen buffer) and ``bias``, under that conv's state-dict keys; every
    other parameter is the method's own.
    """

    kind: ClassVar[str] = ""
    """Registry name, used as ``conv.kind`` in configs."""
    folds_to_conv: ClassVar[bool] = False
    """True when :meth:`fuse` returns a plain ``nn.Conv2d`` with the replaced conv's geometry: the
    deploy model is then the original architecture (built with ``conv.kind: none``). False when the
    deploy model keeps a module of the method's own (built converted, then fused)."""
    needs_trained_weights: ClassVar[bool] = False
    """True when the method re-uses the replaced conv's kernel as a frozen basis (RefConv): converting a
    randomly initialised model then trains on random kernels, which ``refvision fit`` refuses unless asked."""

    @classmethod
    def accepts(cls, conv: nn.Conv2d) -> bool:
        """Whether this method can replace ``conv`` (a plain ``nn.Conv2d``); ``convert`` skips others."""
        return True

    flop_handles: ClassVar[Mapping[str, FlopHandle]] = {}
    """FLOP counts of the ops of the method's own that a tracer cannot look into (a custom autograd
    Function traces as ``prim::PythonOp.<Function name>``), by traced op name; ``profile`` registers
    them for every method in the model."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> ConvMethod:
        """The replacement of ``conv``: same geometry, device, dtype and train/eval mode, ``weight`` /
        ``bias`` copied from it (:meth:`replacing` does that part). Raises ``ValueError`` for a conv
        it cannot take.

        Its keyword-only parameters are the method's options (:meth:`options`): each one typed, so
        that configs are checked against them (``int``, ``float``, ``bool``, ``str``, ``None``,
        ``Literal[...]`` and unions of those are checked by value).
        """
        raise NotImplementedError

    @classmethod
    def replacing(cls: type[_Layer], conv: nn.Conv2d, **init_options: Any) -> _Layer:
        """``cls(...)`` with ``conv``'s geometry and state: what every :meth:`from_conv` starts with.

        Copies from ``conv``: channels, kernel size, stride, padding (including the padding a
        non-zero padding mode applies, fixed at construction), dilation, groups, padding mode,
        device, dtype, train / eval mode; ``bias`` (values and ``requires_grad``), and ``weight``
        where the new layer has one (values, and ``requires_grad`` where it is a parameter, not a
        buffer). ``init_options`` go to ``cls.__init__`` after the ``nn.Conv2d`` arguments.
        Parameters the method adds are left as its ``__init__`` made them.
        """
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **init_options,
        )
        with torch.no_grad():
            if layer.weight is not None:
                layer.weight.copy_(conv.weight)
                if isinstance(layer.weight, nn.Parameter):
                    layer.weight.requires_grad_(conv.weight.requires_grad)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
                layer.bias.requires_grad_(conv.bias.requires_grad)
        layer._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        return layer.train(conv.training)

    @classmethod
    def options(cls) -> dict[str, MethodOption]:
        """The method's options by name: the keyword-only parameters of :meth:`from_conv`, in order.

        Raises:
            TypeError: an option without a type annotation.
        """
        hints = typing.get_type_hints(cls.from_conv)
        declared = {}
        for param in inspect.signature(cls.from_conv).parameters.values():
            if param.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if param.name not in hints:
                raise TypeError(
                    f"{cls.__module__}.{cls.__qualname__}.from_conv: option {param.name!r} has no type "
                    "annotation; a conv method declares the type of each option"
                )
            declared[param.name] = MethodOption(param.name, hints[param.name], param.default)
        return declared

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` as a dict, checked against :meth:`options`: names, types, ``Literal`` values.

        Values a type cannot express (RefConv's ``map_k >= 1``) are checked by :meth:`from_conv`.

        Raises:
            TypeError: an option the method does not declare, or a value of another type; the
                message names the option, the method and its options with their types and defaults.
            ValueError: a value outside the option's ``Literal`` choices (named the same way).
        """
        declared = cls.options()
        allowed = ", ".join(map(str, declared.values())) or "none"
        owner = f"conv kind {method_name(cls)!r}"
        for name, value in options.items():
            option = declared.get(name)
            if option is None:
                raise TypeError(f"{name}: {owner} has no option {name!r}; its options: {allowed}")
            try:
                check_value(name, value, option.type, owner)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{err}; its options: {allowed}") from None
        return dict(options)

    def fuse(self) -> nn.Module:
        """The inference module computing the same function (eval outputs equal up to rounding).

        A new module; ``self`` is left as it is. Its state-dict keys are those of a plain conv when
        :attr:`folds_to_conv`.
        """
        raise NotImplementedError

    def plain_conv(self, kernel: Tensor) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with this layer's geometry, padding mode, device, dtype and train /
        eval mode, holding ``kernel`` (copied, detached; the shape of ``weight``) and this layer's bias:
        what :meth:`fuse` returns for a method that folds into one kernel."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=kernel.device,
            dtype=kernel.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(kernel)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        # Non-zero padding modes pad from this list, fixed at construction even if `padding` was
        # patched later: keep the padding this layer actually applies.
        conv._reversed_padding_repeated_twice = list(self._reversed_padding_repeated_twice)
        return conv.train(self.training)

    def frozen_basis(self) -> Tensor | None:
        """The basis when it is a buffer (never trained, but part of the model's numbers), else None."""
        return self._buffers.get("weight")

    def method_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the parameters the method adds (all but ``weight`` and ``bias``)."""
        for name, param in self.named_parameters():
            if name not in _CONV_TENSORS:
                yield name, param

    def training_only_numel(self) -> int:
        """How many numbers disappear when the layer is fused (counted apart by ``profile``)."""
        if not self.folds_to_conv:
            return 0
        return sum(p.numel() for _, p in self.method_parameters())


_CONV_TENSORS = ("weight", "bias")

_Layer = TypeVar("_Layer", bound=ConvMethod)

M = TypeVar("M", bound=type[ConvMethod])

_METHODS: dict[str, type[ConvMethod]] = {}


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available as ``conv.kind: <cls.kind>``."""
    if not (isinstance(cls, type) and issubclass(cls, ConvMethod)) or not cls.kind:
        raise TypeError(f"register_method: {cls!r} must be a ConvMethod subclass with a non-empty `kind`")
    if cls.kind == "none":
        raise ValueError("register_method: kind 'none' is reserved (no conversion)")
    known = _METHODS.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(
            f"register_method: kind {cls.kind!r} is already taken by {known.__module__}.{known.__qualname__}"
        )
    _METHODS[cls.kind] = cls
    return cls


def registered_methods() -> dict[str, type[ConvMethod]]:
    """Kind name -> class, for every registered method."""
    return dict(_METHODS)


def get_method(kind: str) -> type[ConvMethod]:
    """The method class for ``kind``: a registered name or a ``package.module.ClassName`` path.

    Raises:
        ValueError: an unknown name, a path that does not import, or a class that is no ConvMethod.
    """
    if kind in _METHODS:
        return _METHODS[kind]
    if "." not in kind:
        raise ValueError(
            f"conv kind {kind!r} is unknown; registered: {', '.join(sorted(_METHODS))}, "
            "or give a class path such as 'mypackage.layers.MyConv'"
        )
    try:
        cls = import_class(kind)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"conv kind {kind!r}: cannot import it ({err})") from None
    except ValueError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ConvMethod)):
        raise ValueError(f"conv kind {kind!r} is not a refvision.nn.ConvMethod subclass")
    return cls


def method_name(cls: type[ConvMethod]) -> str:
    """What names ``cls`` in a config: its kind if registered as that class, else its class path."""
    return cls.kind if _METHODS.get(cls.kind) is cls else f"{cls.__module__}.{cls.__qualname__}"
