"""Pure advantage and loss math, and the option sets (``Literal`` types) configs use."""

from vroll.rl.advantages import AdvantageScale
from vroll.rl.losses import DPOLossType, ImportanceSamplingLevel, LossType

__all__ = ["AdvantageScale", "DPOLossType", "ImportanceSamplingLevel", "LossType"]
