"""The Open Inference Protocol v2 (KServe / Triton "v2" REST) on the same service as /v1:
codec.py (the wire format, JSON and binary tensor data), mapping.py (tensors <-> a task's fields),
routes.py (the routes, mounted by `install`)."""
