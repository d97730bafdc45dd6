"""Exponential moving average of the weights (torchvision references' ``--model-ema``, timm's ``ModelEmaV3``).

Built on Lightning's own :class:`~lightning.pytorch.callbacks.WeightAveraging` with
``torch.optim.swa_utils.get_ema_multi_avg_fn``: after every optimizer step
``ema = decay * ema + (1 - decay) * weights`` for every parameter and buffer (BatchNorm statistics
too; the first update copies the weights). Validation runs on the EMA weights, so ``best.ckpt`` is
picked by them. Every checkpoint holds the EMA weights as its ``state_dict`` (what ``test``,
``predict``, ``reparameterize`` and the deploy checkpoint read), the trained weights under
``current_model_state`` and the average's step count under ``averaging_state``, so a resumed fit
continues both exactly. When the fit ends the model holds the EMA weights.
"""

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightEMA(WeightAveraging):
    """EMA of all weights and buffers with ``decay`` in (0, 1), updated after every optimizer step."""

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"WeightEMA(decay={decay}): expected a value in (0, 1)")
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The average is made at setup, before the strategy moves the module to its device: follow it
        # there, so that each update and swap stays on the device instead of crossing to the CPU.
        if self._average_model is not None:
            self._average_model.to(pl_module.device)
