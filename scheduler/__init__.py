"""Phase-splitting planner: cost model, tabu search, LP routing, simulator (imports no torch).

Modules (each small): ``cluster``/``model``/``workload`` (inputs), ``kv_bytes`` (format v1 sizes),
``costmodel`` (roofline latency, transfer, memory), ``parallel`` (per-group parallel config and
capacity), ``routing`` (prefill->decode LP), ``evaluate`` (the search objective), ``tabu`` (upper
level), ``exhaustive`` (enumerator for tests), ``simulator`` + ``metrics`` (discrete-event replay,
goodput), ``systems`` (ours, baselines, ablations), ``reschedule``, ``driver`` + ``report`` (CLI).
"""

from .cluster import Cluster, GpuType, NodeSpec, load_cluster
from .costmodel import CostParams
from .errors import InputError
from .kv_bytes import kv_bytes_per_element
from .model import PRESETS, ModelSpec, load_model
from .workload import SLO, Workload, load_azure_trace, synthetic

__all__ = ["Cluster", "GpuType", "NodeSpec", "load_cluster", "CostParams", "InputError",
           "kv_bytes_per_element", "PRESETS", "ModelSpec", "load_model", "SLO", "Workload",
           "load_azure_trace", "synthetic"]
