from .ddpm import ScratchDDPMScheduler
from .ddim import ScratchDDIMScheduler
from .flow_match_euler import ScratchFlowMatchEulerScheduler
