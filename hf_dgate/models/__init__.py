"""The paper's non-Hugging-Face models, defined here so nothing needs torchvision."""

from .tabular import NAM, NODE, FeatureFirstLayer, LateFusion, ObliviousTrees
from .vision import VGG16, BasicBlock, LeNet300100, ResNet18

__all__ = [
    "NAM",
    "NODE",
    "VGG16",
    "BasicBlock",
    "FeatureFirstLayer",
    "LateFusion",
    "LeNet300100",
    "ObliviousTrees",
    "ResNet18",
]
