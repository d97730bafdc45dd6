"""Lightning glue: checkpoint reading, deploy checkpoints, callbacks, run state, export, prediction writers."""
