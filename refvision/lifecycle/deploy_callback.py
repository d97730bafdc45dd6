"""Lightning callbacks of the refocus workflow."""

import logging
import os
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from refvision.checkpoints.deploy import reparameterize_checkpoint
from refvision.surgery.convert import converted_layers

log = logging.getLogger("refvision")


class DeployCheckpoint(Callback):
    """At the end of ``fit``, write ``<best>-deploy.ckpt`` next to the best checkpoint.

    Only into the run's own checkpoint folder: a resumed fit whose best checkpoint lies in
    another run's folder writes nothing there.

    Only for models with conv-method layers. Logs the train- vs deploy-form parameters and
    FLOPs and the largest output difference of the two forms on the first validation batch,
    both to the console and to the trainer's logger (``deploy/*``). Runs on rank 0 only.
    """

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not converted_layers(pl_module):
            return
        ckpt = trainer.checkpoint_callback
        source = ckpt and (ckpt.best_model_path or ckpt.last_model_path)
        if not source or not os.path.isfile(source):
            log.warning("DeployCheckpoint: no checkpoint was written, so no deploy checkpoint either")
            return
        if ckpt.dirpath is None or os.path.abspath(os.path.dirname(source)) != os.path.abspath(ckpt.dirpath):
            log.warning(
                "DeployCheckpoint: the best checkpoint %s is not in this run's folder %s; "
                "no deploy checkpoint written (run `refvision reparameterize`)",
                source,
                ckpt.dirpath,
            )
            return
        output = Path(source).with_name(Path(source).stem + "-deploy.ckpt")
        inputs = None
        datamodule = trainer.datamodule
        if datamodule is not None:
            batch = next(iter(datamodule.val_dataloader()))
            inputs = pl_module.inputs_of(batch)
        report = reparameterize_checkpoint(source, output, overwrite=True, inputs=inputs)
        log.info("deploy checkpoint:\n%s", report)
        print(f"\nDeploy checkpoint (re-parameterized from {source}):\n{report}")
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "deploy/params_train": report.train.params_total,
                    "deploy/params_deploy": report.deploy.params_total,
                    "deploy/flops_train": report.train.flops,
                    "deploy/flops_deploy": report.deploy.flops,
                    "deploy/max_abs_diff": report.max_abs_diff,
                },
                step=trainer.global_step,
            )
