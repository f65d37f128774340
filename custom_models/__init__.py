from .unet import ScratchUNetModel
from .dit_gqa import ScratchDiTModel
from .mmdit import ScratchMMDiTModel
