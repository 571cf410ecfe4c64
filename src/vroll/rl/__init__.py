"""Pure advantage and loss math, and the option sets (``Literal`` types) configs use."""

from vroll.rl.advantages import AdvantageScale
from vroll.rl.importance import ImportanceSamplingMode, SamplingCorrection
from vroll.rl.losses import DPOLossType, ImportanceSamplingLevel, LossType, Normalizers, PolicyLossConfig

__all__ = ["AdvantageScale", "DPOLossType", "ImportanceSamplingLevel", "ImportanceSamplingMode", "LossType",
           "Normalizers", "PolicyLossConfig", "SamplingCorrection"]
