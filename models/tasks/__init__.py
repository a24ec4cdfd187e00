"""Task pipelines: VQA, retrieval, classification."""
