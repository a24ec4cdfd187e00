from models.families.base import ReducedOutput, ReducibleModel
from models.families.lookupvit import LookupViT
from models.families.vilt import ViltTransformer
from models.families.vision import VisionTransformer

__all__ = ["LookupViT", "ReducedOutput", "ReducibleModel", "ViltTransformer", "VisionTransformer"]
