"""`tokenlean bench`: speed, memory, FLOPs and accuracy of every method and level, side by side."""
