from .ddim import ScratchDDIMScheduler
from .ddpm import ScratchDDPMScheduler
from .flow_match_euler import ScratchFlowMatchEulerScheduler

__all__ = ["ScratchDDIMScheduler", "ScratchDDPMScheduler", "ScratchFlowMatchEulerScheduler"]
