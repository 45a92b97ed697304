"""Shared fixtures: tiny clusters and workloads that keep the suite fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from thunderkv.scheduler.cluster import load_cluster
from thunderkv.scheduler.costmodel import CostParams
from thunderkv.scheduler.model import PRESETS
from thunderkv.scheduler.parallel import WorkloadStats
from thunderkv.scheduler.workload import SLO, synthetic

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "planner"
TRACE = REPO / "examples" / "traces" / "AzureLLMInferenceTrace_conv.csv"

TINY = """
name: tiny
catalog:
  A6000: {fp16_tflops: 155, mem_gb: 48, mem_bw_gbs: 768, price_per_hour: 0.39}
  RTX3090: {fp16_tflops: 71, mem_gb: 24, mem_bw_gbs: 936, price_per_hour: 0.13}
  L40S: {fp16_tflops: 362, mem_gb: 48, mem_bw_gbs: 864, price_per_hour: 0.44}
nodes:
  - {name: n0, gpu: A6000, count: 2, intra_node_gbps: 200}
  - {name: n1, gpu: RTX3090, count: 2, intra_node_gbps: 100}
  - {name: n2, gpu: L40S, count: 2, intra_node_gbps: 200}
network:
  inter_node_gbps: 10
  links:
    - {a: n0, b: n1, gbps: 25}
"""


@pytest.fixture
def tiny_text() -> str:
    return TINY


def tiny_cluster(text: str = TINY):
    return load_cluster("tiny.yaml", text)


@pytest.fixture
def tiny():
    return tiny_cluster()


@pytest.fixture
def model7b():
    return PRESETS["llama-7b"]


@pytest.fixture
def small_wl():
    return synthetic("conversation", 300, 1.0, seed=1)


@pytest.fixture
def stats(small_wl):
    return WorkloadStats.of(small_wl)


@pytest.fixture
def slo():
    return SLO(1.5, 0.1)


@pytest.fixture
def params():
    return CostParams()


def plan_tiny(d: Path, args: list[str]) -> dict:
    """``thunderkv plan`` on :data:`TINY` (written to ``d/c.yaml``) with ``args``; the plan JSON
    is ``d/plan.json``; returns it parsed."""
    import json

    from thunderkv.cli import main

    (d / "c.yaml").write_text(TINY)
    out = d / "plan.json"
    assert main(["plan", "--cluster", str(d / "c.yaml"), "--json", str(out), *args]) == 0
    return json.loads(out.read_text())
