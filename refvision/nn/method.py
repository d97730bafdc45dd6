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

import importlib
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn


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

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> ConvMethod:
        """The replacement of ``conv``: same geometry, device, dtype and train/eval mode, ``weight`` /
        ``bias`` copied from it. Raises ``ValueError`` for a conv it cannot take."""
        raise NotImplementedError

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
    module_name, _, name = kind.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"conv kind {kind!r}: cannot import it ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, ConvMethod)):
        raise ValueError(f"conv kind {kind!r} is not a refvision.nn.ConvMethod subclass")
    return cls


def method_name(cls: type[ConvMethod]) -> str:
    """What names ``cls`` in a config: its kind if registered as that class, else its class path."""
    return cls.kind if _METHODS.get(cls.kind) is cls else f"{cls.__module__}.{cls.__qualname__}"
