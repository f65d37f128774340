from .dit_gqa import ScratchDiTModel
from .mmdit import ScratchMMDiTModel
from .unet import ScratchUNetModel

__all__ = ["ScratchDiTModel", "ScratchMMDiTModel", "ScratchUNetModel"]
