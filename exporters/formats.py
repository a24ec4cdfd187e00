"""Graph formats `tokenlean export` writes (no heavy imports: the CLI's help reads these)."""

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18
