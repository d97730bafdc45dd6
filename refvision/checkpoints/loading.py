"""Reading checkpoint files without running code, and ``init_from``: weights into a freshly built model.

Every checkpoint refvision reads (``--ckpt_path``, ``init_from``, ``reparameterize``, ``export``,
``profile --ckpt``) goes through :func:`read_checkpoint`: ``torch.load(weights_only=True)`` with
only :data:`SAFE_GLOBALS` allowed on top of torch's own tensor / container types, or safetensors.
A file that needs any other pickled object is refused, never unpickled. ``http(s)://`` and
``torchvision://<model>`` sources are downloaded to the torch hub cache first (keyed by the whole URL,
checked before reuse: :func:`download_cached`), then read the same way.

What ``init_from`` accepts inside the file is described in :mod:`refvision.models.weights`.
"""

import argparse
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from refvision.lifecycle.divergence import non_finite_tensors
from refvision.models.weights import explain_download_failure, external_state_dict, map_keys
from refvision.tasks.options import Role, option_roles

log = logging.getLogger("refvision")

SAFE_GLOBALS: list[type] = [argparse.Namespace]
"""Types allowed in a checkpoint beyond torch's weights-only defaults (tensors, dict, OrderedDict,
Counter, list, tuple, str, numbers): ``argparse.Namespace`` is the ``args`` of torchvision's
reference training scripts. It is rebuilt from a plain dict of its attributes; nothing is called."""


class CheckpointError(ValueError):
    """A checkpoint file that refvision will not or cannot read; the message names the file."""


_EVALUATING: contextvars.ContextVar[str | None] = contextvars.ContextVar("refvision_evaluating", default=None)


@contextlib.contextmanager
def evaluating(command: str) -> Iterator[None]:
    """Mark the ``init_from`` loads made inside the block as those of ``refvision <command>``, which
    trains nothing: :func:`load_init_from` then refuses to leave any tensor of the model as built
    (a randomly initialised head), whatever ``init_strict`` says."""
    token = _EVALUATING.set(command)
    try:
        yield
    finally:
        _EVALUATING.reset(token)


@contextlib.contextmanager
def safe_checkpoint_globals() -> Iterator[None]:
    """Allow :data:`SAFE_GLOBALS` in ``torch.load(weights_only=True)`` calls made inside the block."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        yield


def resolve_source(source: str | os.PathLike, option: str) -> Path:
    """The local file behind ``source``: a path, or an ``http(s)://`` / ``torchvision://`` download.

    Downloads are cached under ``$TORCH_HOME/hub/checkpoints`` (see :func:`download_cached`).
    Raises ``FileNotFoundError`` naming ``option`` for a missing local file.
    """
    text = str(source)
    if text.startswith("torchvision://"):
        from mmengine.runner.checkpoint import get_torchvision_models

        urls = get_torchvision_models()
        name = text[len("torchvision://") :]
        if name not in urls:
            raise ValueError(f"{option}={text!r}: torchvision has no weights named {name!r}")
        text = urls[name]
    if is_url(text):
        return download_cached(text, option)
    if "://" in text:
        raise ValueError(
            f"{option}={text!r}: unsupported source; give a local file, an http(s):// URL or torchvision://<model>"
        )
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{option}={text!r}: no such file")
    return path


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an ``http(s)://`` address (not a local path)."""
    return str(source).startswith(("http://", "https://"))


def download_cached(url: str, option: str) -> Path:
    """The local copy of ``url``, downloaded once and checked before every reuse.

    A file name carrying torch.hub's hash suffix (``name-<sha256 prefix>.ext``) is content-addressed:
    it lives at ``$TORCH_HOME/hub/checkpoints/<name>`` (where ``torch.hub`` keeps it too), and its
    SHA-256 must start with the prefix, when downloaded and before reuse. Any other URL lives under
    ``$TORCH_HOME/hub/checkpoints/by-url/<sha256 of the URL, 16 hex>/<name>``, so two URLs with one
    file name never share a copy; a ``<name>.json`` beside it records the size, SHA-256 and the
    server's ``Content-Length`` / ``Last-Modified`` / ``ETag``. It is reused only while its bytes
    match the record and the server (asked with ``HEAD``; unreachable: the checked copy is used)
    still describes the same file; else it is downloaded again. A download whose length differs
    from the announced ``Content-Length`` is refused and not kept.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    prefix = _HASH_SUFFIX.search(name)
    if prefix:
        target = cache / name
        if target.is_file() and _sha256(target).startswith(prefix.group(1)):
            return target
    else:
        target = cache / "by-url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
        if target.is_file() and _cached_copy_current(url, target, option):
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %s to %s", option, url, target)
    with explain_download_failure(url, option):
        record = _download(url, target, option, prefix.group(1) if prefix else None)
    if not prefix:
        target.with_name(target.name + ".json").write_text(json.dumps(record))
    return target


_HASH_SUFFIX = re.compile(r"-([a-f0-9]{8,})\.")
"""torch.hub's file-name convention: the hex digits after the last ``-`` start the file's SHA-256."""

_VALIDATORS = ("content-length", "last-modified", "etag")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_copy_current(url: str, target: Path, option: str) -> bool:
    """Whether the cached ``target`` of ``url`` is whole (size and SHA-256 as recorded) and the server still
    describes the file it was downloaded from (an unreachable server: whole is enough)."""
    try:
        record = json.loads(target.with_name(target.name + ".json").read_text())
    except (OSError, ValueError):
        return False
    if target.stat().st_size != record.get("size") or _sha256(target) != record.get("sha256"):
        log.warning("%s: the cached copy %s of %s is damaged; downloading it again", option, target, url)
        return False
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as response:
            now = {key: response.headers.get(key) for key in _VALIDATORS}
    except (urllib.error.URLError, OSError):
        log.info("%s: %s unreachable; using the checked cached copy %s", option, url, target)
        return True
    changed = [key for key in _VALIDATORS if now[key] is not None and now[key] != record["headers"].get(key)]
    if changed:
        log.info("%s: %s changed on the server (%s); downloading it again", option, url, ", ".join(changed))
    return not changed


def _download(url: str, target: Path, option: str, hash_prefix: str | None) -> dict[str, Any]:
    """Download ``url`` to ``target`` (a temporary file beside it, renamed when whole) and return what
    :func:`_cached_copy_current` checks later."""
    digest, size = hashlib.sha256(), 0
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as f:
            headers = {key: response.headers.get(key) for key in _VALIDATORS}
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                f.write(block)
                size += len(block)
        announced = headers["content-length"]
        if announced is not None and int(announced) != size:
            raise CheckpointError(
                f"{option} {url}: the download stopped at {size} of {announced} bytes; nothing kept, try again"
            )
        if hash_prefix and not digest.hexdigest().startswith(hash_prefix):
            raise CheckpointError(
                f"{option} {url}: the file's SHA-256 is {digest.hexdigest()[:16]}..., but its name says it starts "
                f"with {hash_prefix}; a damaged or replaced file, nothing kept"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return {"url": url, "size": size, "sha256": digest.hexdigest(), "headers": headers}


def read_checkpoint(path: str | os.PathLike, option: str = "checkpoint", source: str | None = None) -> Any:
    """Load local file ``path`` without running code (see the module docstring), tensors on CPU.

    Errors name ``option`` and ``source`` (the URL that ``path`` was downloaded from, if any).

    Raises:
        CheckpointError: the file is empty, truncated, damaged (an entry of the archive fails its
            CRC-32: the message names it) or not a checkpoint (neither a zip archive nor torch's legacy
            format: text, an HTML page, random bytes), or it holds pickled objects other than tensors
            and plain containers (the message lists them and what to do).
    """
    path = Path(path)
    name = f"{option} {source} (downloaded to {path})" if source and str(source) != str(path) else f"{option} {path}"
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{name}: the file is empty (0 bytes); an interrupted copy or save? "
            "Use another checkpoint, e.g. last.ckpt or an earlier one."
        )
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except SafetensorError as err:
            raise CheckpointError(f"{name}: not a readable safetensors file ({err}); truncated?") from None
    _check_container(path, name)
    try:
        with safe_checkpoint_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_needs_pickle_message(name, path, err)) from None
    except (EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(_unreadable_message(name, path, err)) from None
    except RuntimeError as err:
        if "zip archive" in str(err) or "PytorchStreamReader" in str(err) or "magic number" in str(err):
            raise CheckpointError(_unreadable_message(name, path, err)) from None
        raise


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
"""How ``torch.save``'s legacy (non-zip) format starts: pickle protocol 2, then its magic number."""


def _check_container(path: Path, name: str) -> None:
    """Refuse ``path`` unless it is a whole zip archive whose every entry passes its CRC-32 (what
    ``torch.save`` writes) or starts as torch's legacy format does.

    The CRC check reads the whole file once more (measured in docs/reliability.md): torch itself
    checks no CRC, so a flipped bit in a tensor would load as a wrong weight.
    """
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_LEGACY_MAGIC):
        return
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{name}: not a checkpoint: {_what_it_is(head)}; expected a file written by torch.save")
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                try:
                    with archive.open(entry) as member:
                        while member.read(1 << 24):
                            pass
                except zipfile.BadZipFile as err:
                    raise CheckpointError(
                        f"{name}: damaged: entry {entry.filename} of the archive fails its check ({err}); the file "
                        "was corrupted on disk or in transfer; use another copy or an earlier checkpoint"
                    ) from None
    except (zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(_unreadable_message(name, path, err)) from None


def _what_it_is(head: bytes) -> str:
    """What a file starting with ``head`` is, for a refusal: an HTML page, text, or other bytes."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML page (a web page saved instead of the file: an error or login page?)"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut at the end of the 64 bytes read is still text
        decoded = head[: err.start].decode("utf-8") if err.start >= len(head) - 3 else ""
    if not decoded or not all(char.isprintable() or char in "\t\n\r\f" for char in decoded):
        return f"neither a zip archive nor torch's legacy format (it starts with bytes {head[:8].hex(' ')})"
    first = decoded.strip().splitlines()[0][:40] if decoded.strip() else ""
    return f"a text file (it starts with {first!r})"


def _unreadable_message(name: str, path: Path, err: BaseException) -> str:
    return (
        f"{name}: not a complete PyTorch checkpoint ({path.stat().st_size} bytes; "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unexpected end of file'}). "
        "The file is truncated or is not a checkpoint; use another one, e.g. last.ckpt or an earlier save."
    )


def _needs_pickle_message(name: str, path: Path, err: BaseException) -> str:
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - old (non-zip) format: fall back to torch's own message
        needed = []
    what = ", ".join(needed) if needed else str(err).splitlines()[0]
    hint = ""
    if any(n.startswith("mmengine.") or n.startswith("numpy.") for n in needed):
        hint = (
            " OpenMMLab training checkpoints keep the logger state ('message_hub') next to the weights; "
            "the published model-zoo files (tools/model_converters/publish_model.py) do not."
        )
    return (
        f"{name} needs pickle to load: it holds objects other than tensors and plain containers "
        f"({what}). Unpickling them could run arbitrary code, so refvision loads checkpoints with "
        f"torch.load(weights_only=True) only.{hint} If you trust the file, keep only its weights: "
        f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
        f"torch.save({{'state_dict': c.get('state_dict', c.get('model', c))}}, '{path}.weights.pth')\" "
        "and pass the new file."
    )


def describe_checkpoint(checkpoint: Any) -> str:
    """A one-line account of what a loaded checkpoint holds: a refvision checkpoint's task and the architecture
    and data options it gives as a name or number; otherwise its format, tensor count and top-level keys."""
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}, not a dict"
    task = task_of(checkpoint)
    keys = ", ".join(map(str, list(checkpoint)[:6])) + (" ..." if len(checkpoint) > 6 else "")
    if task:
        hp = checkpoint.get("hyper_parameters") or {}
        named = [
            k for k in _identity_options(task) if isinstance(hp.get(k), (str, int)) and not isinstance(hp[k], bool)
        ]
        details = f" ({', '.join(f'{k}={hp[k]}' for k in named)})" if named else ""
        return f"a refvision {task.rpartition('.')[2]} checkpoint{details}"
    tensors = sum(isinstance(v, torch.Tensor) for v in checkpoint.values())
    if tensors == len(checkpoint):
        return f"a plain state dict of {tensors} tensors (first keys: {keys})"
    return f"a dict with keys {keys}"


def _identity_options(task: str) -> tuple[str, ...]:
    """The architecture and data options (:class:`~refvision.tasks.options.Role`) of the task of class path
    ``task``, in declaration order; none if no such class is loaded (a checkpoint's word imports nothing)."""
    module, _, name = task.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not isinstance(cls, type):
        return ()
    try:
        roles = option_roles(cls)
    except TypeError:
        return ()
    return tuple(key for key, role in roles.items() if role in (Role.ARCHITECTURE, Role.DATA))


def class_path(cls: type) -> str:
    """``package.module.Name``: how configs and checkpoints name a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def refvision_stamp(task_cls: type, form: str, **details: Any) -> dict[str, Any]:
    """The ``refvision`` entry of a checkpoint: the class path of the task that wrote it (:func:`task_of`),
    the ``form`` of the model it holds, ``train`` or ``deploy`` (:func:`checkpoint_form`), and ``details``."""
    return {"task": class_path(task_cls), "form": form, **details}


def task_of(checkpoint: Any) -> str | None:
    """The class path of the refvision task that wrote ``checkpoint``, if it says."""
    if not isinstance(checkpoint, dict):
        return None
    hp = checkpoint.get("hyper_parameters")
    return (checkpoint.get("refvision") or {}).get("task") or (hp.get("_class_path") if isinstance(hp, dict) else None)


def checkpoint_form(checkpoint: Any) -> str | None:
    """``train`` or ``deploy``: which form of its model a refvision checkpoint holds (None: not a refvision one).

    Checkpoints that predate the ``refvision`` entry say it through ``hyper_parameters.deploy``.
    """
    if not task_of(checkpoint):
        return None
    form = (checkpoint.get("refvision") or {}).get("form")
    return form or ("deploy" if (checkpoint.get("hyper_parameters") or {}).get("deploy") else "train")


def converted_kind(checkpoint: Any) -> str | None:
    """The conv method of a refvision training-form checkpoint whose convs were converted (None otherwise).

    Such a checkpoint is not the trained network until re-parameterized: RefConv keeps the frozen
    basis under each conv's ``weight`` key and the trained transform beside it.
    """
    if checkpoint_form(checkpoint) != "train":
        return None
    kind = ((checkpoint.get("hyper_parameters") or {}).get("conv") or {}).get("kind", "none")
    return None if kind == "none" else str(kind)


def check_task_checkpoint(
    source: str | os.PathLike, task_class: str | None, option: str = "--ckpt_path"
) -> tuple[Path, dict]:
    """Resolve, read and check a Lightning checkpoint meant for a model of class path ``task_class``.

    Returns ``(local path, loaded checkpoint)``. Raises :class:`CheckpointError` for a file that
    is not a Lightning checkpoint (``init_from`` is the option for bare weights) or was written by
    another refvision task (e.g. a detection checkpoint given to the segmentation config).
    """
    path = resolve_source(source, option)
    checkpoint = read_checkpoint(path, option, str(source))
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"{option} {source}: not a Lightning checkpoint (no 'state_dict'); "
            f"it holds {describe_checkpoint(checkpoint)}. "
            "To start from bare or external weights use --model.init_from."
        )
    task = task_of(checkpoint)
    if task and task_class and task.rpartition(".")[2] != str(task_class).rpartition(".")[2]:
        raise CheckpointError(
            f"{option} {source} holds {describe_checkpoint(checkpoint)}, but the config builds {task_class}; "
            "pass a checkpoint of the same task (or the config that wrote this one)."
        )
    return path, checkpoint


def extract_state_dict(checkpoint: Any, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Return the network's state dict from a loaded ``checkpoint`` (any format of :func:`external_state_dict`).

    ``prefix`` keeps only keys that start with it and strips it (e.g. ``backbone.`` to take a
    detector's backbone). ``None`` strips the format's own prefix (Lightning's ``model.``).
    """
    state, default_prefix, _ = external_state_dict(checkpoint)
    prefix = default_prefix if prefix is None else prefix
    if not prefix:
        return dict(state)
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f"no key starts with init_prefix={prefix!r}; first keys: {list(state)[:5]}")
    return picked


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_init_from` matched: keys are those of the target module."""

    source: str
    format: str
    target: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def counts(self) -> str:
        """``N tensors loaded, N missing, N unexpected, N shape mismatches``."""
        return (
            f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape mismatches"
        )

    def details(self) -> list[str]:
        """The keys behind the counts (the first 8 of each kind): ``missing: a, b ...``, ``shape of k: file
        [..] vs model [..]``. BatchNorm's ``num_batches_tracked`` counters are counted but not listed:
        every BatchNorm has one, and they say nothing about which layers differ."""
        lines = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            named = [k for k in keys if not k.endswith("num_batches_tracked")] or keys
            if named:
                lines.append(f"{label}: {', '.join(named[:8])}{' ...' if len(named) > 8 else ''}")
        lines += [
            f"shape of {key}: file {list(theirs)} vs model {list(ours)}" for key, theirs, ours in self.mismatched[:8]
        ]
        return lines

    def __str__(self) -> str:
        where = f"model.{self.target}" if self.target else "the model"
        header = f"init_from {self.source} ({self.format}) into {where}: {self.counts()}"
        return "\n".join([header, *(f"  {line}" for line in self.details())])


def load_init_from(model: nn.Module, source: str, prefix: str | None = None, strict: bool = True) -> LoadReport:
    """Load ``source`` into ``model`` (in place) and return the :class:`LoadReport`.

    The weights go into the whole model or, when they fit it better, into one direct child
    (smp encoder weights into a segmenter's ``encoder``). With ``strict`` every tensor of the
    target must be loaded, none left over and no shape differ; without, the tensors that fit are
    loaded and the rest is reported (e.g. a 1000-class head skipped for a 10-class model).

    Inside :func:`evaluating` (``test`` / ``validate`` / ``predict``) every tensor of the target
    must be loaded even when ``strict`` is false: nothing trains what the file leaves out; and none
    may hold NaN or inf.

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError: a file that cannot be read safely (see :func:`read_checkpoint`), or the
            training form of a converted refvision model (its convs' ``weight`` is not the trained
            kernel; the message names the deploy checkpoint to use instead).
        ValueError: keys or shapes that do not fit ``model``; the message is the load report
            and names ``init_prefix`` / ``init_strict`` (or, evaluating a refvision checkpoint,
            ``--ckpt_path``).
        WeightsUnavailableError: a URL that cannot be downloaded.
    """
    checkpoint = read_checkpoint(resolve_source(source, "model.init_from"), "model.init_from", source)
    kind = converted_kind(checkpoint)
    if kind is not None:
        raise CheckpointError(
            f"model.init_from={source!r} holds the training form of a conv.kind={kind} model: its convs' weights "
            "are not the trained network's until it is re-parameterized, so loading them into a model as built "
            "would lose the training. Pass its deploy checkpoint instead: best-deploy.ckpt next to it, or "
            f"`refvision reparameterize --ckpt {source} --output deploy.ckpt`."
        )
    try:
        _, _, fmt = external_state_dict(checkpoint)
        state = map_keys(extract_state_dict(checkpoint, prefix), model)
    except ValueError as err:
        raise ValueError(f"model.init_from={source!r} ({describe_checkpoint(checkpoint)}): {err}") from None
    report = _best_placement(model, state, source, fmt)
    command = _EVALUATING.get()
    bad = non_finite_tensors({k: state[k] for k in report.loaded})
    if command is not None and bad:
        raise CheckpointError(
            f"model.init_from={source!r} holds non-finite weights (NaN or inf) in {', '.join(bad[:5])}"
            f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; refvision {command} would evaluate them"
        )
    left_as_built = command is not None and bool(report.missing or report.mismatched)
    if not report.loaded or left_as_built or (strict and (report.mismatched or report.missing or report.unexpected)):
        if command is not None and task_of(checkpoint):
            hint = (
                f"To {command} a refvision checkpoint pass it as --ckpt_path (it builds the model the "
                "checkpoint describes); model.init_from loads weights into a model to be trained."
            )
        elif left_as_built:
            hint = (
                f"refvision {command} trains nothing, so these tensors would keep their random "
                "initialisation; pass weights that cover the whole model (--ckpt_path for a checkpoint "
                "of this task)."
            )
        else:
            hint = (
                "use --model.init_prefix to pick a sub-tree of the checkpoint, or --model.init_strict false to "
                "load the tensors that fit and skip the others (reported)"
            )
        raise ValueError(_misfit_message(model, source, checkpoint, state, report, hint, fits_but_head=command is None))
    target = model.get_submodule(report.target) if report.target else model
    target.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    log.log(logging.WARNING if report.missing or report.unexpected or report.mismatched else logging.INFO, "%s", report)
    return report


def _misfit_message(
    model: nn.Module,
    source: str,
    checkpoint: Any,
    state: Mapping[str, torch.Tensor],
    report: LoadReport,
    hint: str,
    fits_but_head: bool,
) -> str:
    """The one-line error of an ``init_from`` that does not fit: what differs, in the terms that lead to
    the fix (a new head; timm weights for a torchvision model), then the keys, then ``hint``.

    ``fits_but_head``: a file that differs only in the head is reported as such, with
    ``--model.init_strict false`` as the fix (not while evaluating: nothing would train the head).
    """
    target = model.get_submodule(report.target) if report.target else model
    head = _new_head(target, report)
    if head is not None and fits_but_head:
        name, theirs, ours = head
        unit = "classes" if isinstance(target.get_submodule(name), nn.Linear) else "outputs"
        return (
            f"model.init_from={source!r} has another head: {report.target + '.' if report.target else ''}{name} has "
            f"{theirs} {unit} in the file and {ours} in the model (the data's); the other {len(report.loaded)} "
            f"tensors fit. To train a new {name} from these weights pass --model.init_strict false (the "
            f"{len(report.loaded)} tensors are loaded, {name} keeps its initialisation)"
        )
    timm_name = None if report.loaded else _matching_timm_model(target, state)
    if timm_name is not None:
        return (
            f"model.init_from={source!r} holds timm's {timm_name} weights (keys {_listed(state)}), which fit "
            f"none of this {type(target).__name__}'s tensors (keys {_listed(target.state_dict())}; "
            f"{report.counts()}); pass --model.backbone timm:{timm_name} to build the model they are for"
        )
    return (
        f"model.init_from={source!r} does not fit {type(target).__name__}: "
        f"{'; '.join([report.counts(), *report.details()])}; the file holds {describe_checkpoint(checkpoint)}. {hint}"
    )


def _listed(state: Mapping[str, Any], count: int = 3) -> str:
    """The first ``count`` keys of ``state`` that hold weights (no BatchNorm statistics or counters)."""
    keys = [k for k in state if not k.endswith(("num_batches_tracked", "running_mean", "running_var"))]
    return ", ".join(keys[:count]) + (" ..." if len(keys) > count else "")


def _new_head(model: nn.Module, report: LoadReport) -> tuple[str, int, int] | None:
    """``(module name, outputs in the file, outputs in the model)`` when the only difference is the
    output count of ``model``'s last module with parameters (a classifier for another number of classes)."""
    if not report.loaded or report.missing or report.unexpected or not report.mismatched:
        return None
    names = {key.rpartition(".")[0] for key, _, _ in report.mismatched}
    last = [name for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]
    if len(names) != 1 or not last or last[-1] not in names:
        return None
    if any(theirs[1:] != ours[1:] for _, theirs, ours in report.mismatched):
        return None
    _, theirs, ours = report.mismatched[0]
    return last[-1], theirs[0], ours[0]


TIMM_CANDIDATES = 12
"""At most this many timm architectures of the model's family are built (on the meta device) to name the one
whose weights a file holds."""


def _matching_timm_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """The timm architecture whose state dict has ``state``'s keys and shapes (the classifier's output
    count aside), searched among the models named like ``model``'s class (``MobileNetV2`` ->
    ``mobilenetv2*``); None if none of them does."""
    family = type(model).__name__.lower()
    for name in timm.list_models(f"{family}*")[:TIMM_CANDIDATES]:
        with torch.device("meta"):
            candidate = timm.create_model(name, pretrained=False)
        classifier = f"{candidate.pretrained_cfg.get('classifier', '')}."
        own = candidate.state_dict()
        if own.keys() == state.keys() and all(own[k].shape == state[k].shape or k.startswith(classifier) for k in own):
            return name
    return None


def state_differences(own: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` (a file's tensors) differs from ``own`` (a module's ``state_dict()``): the keys
    of ``own`` that ``state`` lacks, the keys of ``state`` that ``own`` lacks, and the shared keys
    whose shapes differ (an entry that is no tensor has no shape), each in its mapping's order."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    return missing, unexpected, mismatched


def _best_placement(model: nn.Module, state: dict[str, torch.Tensor], source: str, fmt: str) -> LoadReport:
    """The report for loading ``state`` into the model or the direct child it fits best."""
    candidates = [""] + [name for name, _ in model.named_children()]
    reports = []
    for name in candidates:
        own = (model.get_submodule(name) if name else model).state_dict()
        missing, unexpected, mismatched = state_differences(own, state)
        resized = set(mismatched)
        reports.append(
            LoadReport(
                source=source,
                format=fmt,
                target=name,
                loaded=[k for k in state if k in own and k not in resized],
                missing=missing,
                unexpected=unexpected,
                mismatched=[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched],
            )
        )
    # The whole model wins ties: a child is chosen only when strictly more tensors land in it.
    return max(reports, key=lambda r: (len(r.loaded), r.target == ""))
