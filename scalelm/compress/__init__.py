"""Compression: pruning, distillation, quantization and ONNX export of a trained model."""
