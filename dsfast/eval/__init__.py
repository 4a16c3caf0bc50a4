"""Evaluation of few-shot generation: intra-cluster diversity (Intra-LPIPS protocol), memorisation, fidelity, FID.

``dsfast eval --samples DIR --train DIR`` is the command line (:mod:`dsfast.eval.cli`).
"""
from dsfast.eval.distances import HaarDistance, LpipsDistance, MetricUnavailable, get_distance
from dsfast.eval.metrics import (
    assign_clusters,
    evaluate,
    hf_energy,
    intra_cluster_diversity,
    memorisation_rate,
    memorisation_threshold,
)
from dsfast.images import ImageFolderError, list_images, load_folder, read_image  # one loader for all of dsfast

__all__ = [
    "HaarDistance", "LpipsDistance", "MetricUnavailable", "get_distance", "ImageFolderError", "list_images",
    "load_folder", "read_image", "assign_clusters", "evaluate", "hf_energy", "intra_cluster_diversity",
    "memorisation_rate", "memorisation_threshold",
]
