"""smog_kernels: fused kernels for the grouping step of SMoG (assignment, group statistics,
momentum update, group contrastive loss, spherical k-means) with a plain-PyTorch reference, and the
grouping step as a module (`Grouping`) with its memory bank (`MemoryBank`).

Backends (smog_kernels.backend.Backend) are listed in smog_kernels.registry; docs/kernels.md says
how to add an op or a backend."""
from smog_kernels.api import assign, group_contrastive_loss, group_stats, momentum_update, spherical_kmeans
from smog_kernels.backend import Backend
from smog_kernels.graphed_step import GraphedGroupingStep
from smog_kernels.grouping import Grouping
from smog_kernels.kmeans import StatsReducer
from smog_kernels.memory_bank import MemoryBank
from smog_kernels.registry import available_backends
from smog_kernels.step import GroupingCycle, GroupingStep, grouping_step

__all__ = [
    "Backend",
    "GraphedGroupingStep",
    "Grouping",
    "GroupingCycle",
    "GroupingStep",
    "MemoryBank",
    "StatsReducer",
    "assign",
    "available_backends",
    "group_contrastive_loss",
    "group_stats",
    "grouping_step",
    "momentum_update",
    "spherical_kmeans",
]
__version__ = "0.1.0"
