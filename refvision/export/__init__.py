"""Export of a checkpoint's deploy form: ONNX, TorchScript, ExportedProgram."""
