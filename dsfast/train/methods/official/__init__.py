"""The released DomainStudio training steps (``loss.mode=official``), each its own class beside the corrected one
it differs from: the released code exists for unconditional UNet2DModels and Stable Diffusion only."""
from __future__ import annotations

from .sd import OfficialDomainStudioSD, OfficialDreamBooth, OfficialFinetuneSD
from .unet2d import OfficialDomainStudio

__all__ = ["OfficialDomainStudio", "OfficialDomainStudioSD", "OfficialDreamBooth", "OfficialFinetuneSD"]
