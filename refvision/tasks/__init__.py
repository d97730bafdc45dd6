"""The Lightning tasks: one ``LightningModule`` per task over the shared
:class:`~refvision.tasks.base.RefvisionTask`."""
