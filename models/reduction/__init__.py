"""Pure tensor functions for token reduction: no knowledge of any model."""
