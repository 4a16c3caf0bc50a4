"""dsfast operators: differentiable, backend-dispatched (``backend="auto"|"torch"|"cpp"|"cuda"|"triton"``).

The compiled kernels are ``torch.library`` custom ops with fake implementations, so
``torch.compile`` traces these functions without graph breaks.
"""
from dsfast.ops._backend import available_backends, resolve_backend
from dsfast.ops.domainstudio_loss import DomainStudioTerms, domainstudio_loss
from dsfast.ops.haar_dwt2 import haar_dwt2, haar_idwt2, haar_wavedec2, haar_waverec2
from dsfast.ops.hf_pairwise_similarity_kl import hf_pairwise_similarity_kl
from dsfast.ops.high_frequency import hf_mse, high_frequency
from dsfast.ops.pairwise_similarity_kl import pairwise_similarity_kl

__all__ = [
    "available_backends",
    "resolve_backend",
    "haar_dwt2",
    "haar_idwt2",
    "haar_wavedec2",
    "haar_waverec2",
    "high_frequency",
    "hf_mse",
    "pairwise_similarity_kl",
    "hf_pairwise_similarity_kl",
    "domainstudio_loss",
    "DomainStudioTerms",
]
