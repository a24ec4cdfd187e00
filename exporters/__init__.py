"""ONNX and TorchScript exporters for reduced-token models."""
