"""dsfast: fast, memory-lean few-shot adaptation of diffusion models (DomainStudio, DreamBooth)."""
from dsfast import ops, reference
from dsfast.losses import (
    DomainStudioLoss,
    DomainStudioLossOutput,
    HighFrequencyMSELoss,
    HighFrequencySimilarityLoss,
    PairwiseSimilarityLoss,
    PriorPreservationLoss,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "DomainStudioLoss",
    "DomainStudioLossOutput",
    "HighFrequencyMSELoss",
    "HighFrequencySimilarityLoss",
    "PairwiseSimilarityLoss",
    "PriorPreservationLoss",
]
