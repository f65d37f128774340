from .unet import ScratchUNetModel
