"""Named pretrained weights: fetched by torchvision/timm/smp, with an offline failure that says what to do."""

import contextlib
import urllib.error
from collections.abc import Iterator


class WeightsUnavailableError(RuntimeError):
    """A named pretrained weight could not be downloaded (no network, or the name is wrong)."""


_NETWORK_ERRORS: tuple[type[BaseException], ...] = (urllib.error.URLError, ConnectionError, TimeoutError)
try:  # huggingface_hub backs timm and smp downloads; it raises its own error types when offline.
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _NETWORK_ERRORS += (HfHubHTTPError, LocalEntryNotFoundError)
except ImportError:  # pragma: no cover - huggingface_hub comes with timm
    pass


TORCH_HUB_CACHE = (
    "the torch hub cache ($TORCH_HOME/hub/checkpoints/, default ~/.cache/torch/hub/checkpoints/) "
    "under its original file name"
)
HF_CACHE = "the Hugging Face cache ($HF_HOME/hub, default ~/.cache/huggingface/hub) and set HF_HUB_OFFLINE=1"


@contextlib.contextmanager
def explain_download_failure(what: str, option: str, cache: str = TORCH_HUB_CACHE) -> Iterator[None]:
    """Re-raise a network failure while fetching ``what`` as :class:`WeightsUnavailableError`.

    The message names the weight, the option that asked for it (``option``, e.g. ``model.weights``)
    and the local-file alternatives: download the file where there is network and pass it with
    ``model.init_from``, or place it in ``cache`` (where the downloading library looks first).
    """
    try:
        yield
    except _NETWORK_ERRORS as err:
        raise WeightsUnavailableError(
            f"could not download {what} (requested by `{option}`): {err}. "
            "Without network, download the weight file on another machine and either pass it "
            f"with `--model.init_from /path/to/file.pth` (and set `{option}` to null), or put it "
            f"into {cache}."
        ) from err
