from models.families.base import ReducedOutput, ReducibleModel
from models.families.vilt import ViltTransformer
from models.families.vision import VisionTransformer

__all__ = ["ReducedOutput", "ReducibleModel", "ViltTransformer", "VisionTransformer"]
