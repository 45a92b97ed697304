"""Input loading: examples load; bad YAML/CSV give errors naming the field and the line."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import EXAMPLES, TINY, TRACE
from thunderkv.scheduler.cluster import load_cluster
from thunderkv.scheduler.errors import InputError
from thunderkv.scheduler.model import PRESETS, load_model
from thunderkv.scheduler.workload import (
    MAX_REPLAY_REQUESTS,
    Workload,
    load_azure_trace,
    synthetic,
)


def test_example_clusters_load_with_expected_prices():
    cloud = load_cluster(EXAMPLES / "cloud-32.yaml")
    assert len(cloud.gpus) == 32
    assert cloud.price_per_hour() == pytest.approx(13.20)
    inhouse = load_cluster(EXAMPLES / "inhouse-a100x8.yaml")
    assert len(inhouse.gpus) == 8 and inhouse.price_per_hour() == pytest.approx(13.52)
    market = load_cluster(EXAMPLES / "inhouse-a100x8-market.yaml")
    assert market.price_per_hour() == pytest.approx(5.44)
    assert cloud.link_gbps("a100-0", "l40s-0") == 25 == cloud.link_gbps("l40s-0", "a100-0")
    assert cloud.link_gbps("a100-0", "a6000-1") == 5
    assert cloud.link_gbps("a100-0", "a100-0") == 2400
    assert cloud.nic_bytes_per_s("a100-0") == 25e9 / 8 == cloud.nic_bytes_per_s("rtx3090-0")
    assert market.nic_bytes_per_s("dgx0") is None


def test_nic_gbps_node_overrides_network_default():
    c = load_cluster("c.yaml", TINY.replace("count: 2, intra_node_gbps: 100}",
                                            "count: 2, intra_node_gbps: 100, nic_gbps: 40}")
                     .replace("  inter_node_gbps: 10\n", "  inter_node_gbps: 10\n  nic_gbps: 25\n"))
    assert c.nic_bytes_per_s("n1") == 40e9 / 8 and c.nic_bytes_per_s("n0") == 25e9 / 8
    assert load_cluster("c.yaml", TINY).nic_bytes_per_s("n0") is None
    # a plan JSON carries them
    from thunderkv.scheduler.plan import cluster_from_dict, cluster_to_dict
    back = cluster_from_dict(cluster_to_dict(c))
    assert [back.nic_bytes_per_s(n.name) for n in back.nodes] == \
        [c.nic_bytes_per_s(n.name) for n in c.nodes]
    assert back.without_nodes({"n1"}).nic_bytes_per_s("n0") == 25e9 / 8


@pytest.mark.parametrize("old,new,field,line", [
    ("count: 2, intra_node_gbps: 200}\n  - {name: n1", "count: -2, intra_node_gbps: 200}\n  - {name: n1",
     "nodes[0].count", 8),
    ("gpu: RTX3090, count", "gpu: RTX9090, count", "nodes[1].gpu", 9),
    ("{a: n0, b: n1, gbps: 25}", "{a: n0, b: n7, gbps: 25}", "network.links[0].b", 14),
    ("mem_gb: 24,", "mem_gb: lots,", "catalog.RTX3090.mem_gb", 5),
    ("  inter_node_gbps: 10\n", "  inter_node_gbps: 0\n", "network.inter_node_gbps", 12),
    ("{name: n2, gpu: L40S, count: 2, intra_node_gbps: 200}", "{name: n2, gpu: L40S, count: 2}",
     "nodes[2].intra_node_gbps", 10),
    ("count: 2, intra_node_gbps: 100}", "count: 2, intra_node_gbps: 100, nic_gbps: -1}",
     "nodes[1].nic_gbps", 9),
    ("  inter_node_gbps: 10\n", "  inter_node_gbps: 10\n  nic_gbps: fast\n", "network.nic_gbps", 13),
])
def test_bad_cluster_yaml_names_field_and_line(old, new, field, line):
    assert old in TINY
    with pytest.raises(InputError) as ei:
        load_cluster("c.yaml", TINY.replace(old, new))
    assert ei.value.field == field
    assert ei.value.line == line
    assert f"c.yaml:{line}: {field}:" in str(ei.value)


def test_invalid_yaml_syntax_reports_line():
    with pytest.raises(InputError, match=r"c.yaml:[34]: invalid YAML") as ei:
        load_cluster("c.yaml", "name: x\ncatalog:\n  A: {fp16_tflops: 1\nnodes: []\n")
    assert ei.value.line in (3, 4)  # the unclosed brace opens on 3; the parser notices on 4


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(InputError, match="cannot read file"):
        load_cluster(tmp_path / "nope.yaml")


def test_model_presets_and_yaml(tmp_path):
    m = PRESETS["llama-30b"]
    assert m.weight_bytes / 1e9 == pytest.approx(65, rel=0.02)      # gpu_catalog.md: ~65 GB
    assert m.kv_bytes_per_token() / 1e6 == pytest.approx(1.6, rel=0.01)  # ~1.6 MB per token
    assert load_model(EXAMPLES / "llama-30b.yaml") == m
    bad = tmp_path / "m.yaml"
    bad.write_text("layers: 60\nhidden: 6656\nheads: 52\nkv_heads: 0\nffn: 17920\nvocab: 32000\n")
    with pytest.raises(InputError, match=r"m.yaml:4: kv_heads: must be > 0"):
        load_model(bad)
    with pytest.raises(InputError, match="unknown model preset"):
        load_model("llama-999b")


def test_azure_trace_as_published():
    wl = load_azure_trace(TRACE)
    assert len(wl) == 19366
    assert wl.prompts.mean() == pytest.approx(1155, abs=1)
    assert wl.outputs.mean() == pytest.approx(211, abs=1)
    assert wl.arrivals[0] == 0 and 3500 < wl.arrivals[-1] < 3700


@pytest.mark.parametrize("body,line,field", [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n", 1, "header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
     "2023-11-16 18:15:47.1,abc,3\n", 3, "ContextTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,374,44\n", 2, "TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,0\n", 2, "GeneratedTokens"),
])
def test_bad_trace_names_field_and_line(tmp_path, body, line, field):
    f = tmp_path / "t.csv"
    f.write_text(body)
    with pytest.raises(InputError) as ei:
        load_azure_trace(f)
    assert ei.value.line == line and ei.value.field == field


def test_arrivals_poisson_and_trace_rate():
    wl = load_azure_trace(TRACE, limit=3000)
    p = wl.with_poisson(10.0, seed=3)
    assert p.rate == pytest.approx(10.0, rel=0.06)
    assert np.array_equal(p.prompts, wl.prompts)
    t = wl.with_rate(7.0)
    assert t.rate == pytest.approx(7.0, rel=1e-9)
    assert np.allclose(np.diff(t.arrivals), np.diff(wl.arrivals) * wl.rate / 7.0)


def test_replay_span_cycles_requests_in_order():
    wl = load_azure_trace(TRACE, limit=300)
    wl.min_replay_s = 100.0
    p = wl.arrivals_at(10.0, "poisson", seed=1)  # >= 100 s at 10 req/s: >= 1000 requests
    assert len(p) == 1001 and p.arrivals[-1] == pytest.approx(100.0, rel=0.1)
    assert np.array_equal(p.prompts, np.tile(wl.prompts, 4)[:1001])
    assert np.array_equal(p.outputs, np.tile(wl.outputs, 4)[:1001])
    t = wl.arrivals_at(10.0, "trace")  # the trace's own gaps, repeated, time-scaled
    gaps = np.diff(t.arrivals)
    assert len(t) == 1001 and t.rate == pytest.approx(10.0, rel=1e-9)
    assert np.allclose(gaps[300:599], gaps[:299]) and gaps[299] == pytest.approx(0.1, rel=0.05)
    assert t.min_replay_s == 100.0  # carried by every derived workload
    assert len(wl.arrivals_at(1000.0, "poisson")) == 100001
    wl.min_replay_s = 1e9  # capped: a goodput search's upward bracket must not exhaust memory
    assert len(wl.arrivals_at(1.0, "trace")) == MAX_REPLAY_REQUESTS
    wl.min_replay_s = 0.0
    assert len(wl.arrivals_at(10.0)) == 300  # no span: the workload once
    with pytest.raises(ValueError, match="min_replay_s"):
        Workload(np.zeros(2), [1, 1], [1, 1], min_replay_s=-1.0)


def test_synthetic_coding_matches_issue_shape():
    wl = synthetic("coding", 5000, 2.0, seed=0)
    assert wl.prompts.mean() == pytest.approx(2048, rel=0.05)
    assert wl.outputs.mean() == pytest.approx(28, rel=0.08)
    with pytest.raises(InputError):
        synthetic("poetry")


@pytest.mark.parametrize("old,new,field,line,words", [
    ("name: tiny\n", "name: tiny\ntypo_field: 3\n", "typo_field", 3, "unknown field"),
    ("count: 2, intra_node_gbps: 100}", "count: 2, intra_node_gbps: 100, extra: 1}",
     "nodes[1].extra", 9, "unknown field"),
    ("  inter_node_gbps: 10\n", "  inter_node_gbps: 10\n  nic_gpbs: 25\n", "network.nic_gpbs", 13,
     "unknown field"),
    ("mem_gb: 24,", "mem_gb: 24, membw: 9,", "catalog.RTX3090.membw", 5, "unknown field"),
    ("    - {a: n0, b: n1, gbps: 25}\n", "    - {a: n0, b: n1, gbps: 25}\n    - {a: n1, b: n0, gbps: 1}\n",
     "network.links[1]", 15, "already given on line 14"),
    ("  L40S: {", "  A6000: {fp16_tflops: 1, mem_gb: 1, mem_bw_gbs: 1, price_per_hour: 9}\n  L40S: {",
     "A6000", 6, "duplicate key 'A6000' (first on line 4)"),
])
def test_ambiguous_cluster_yaml_is_refused(old, new, field, line, words):
    """Misspelt fields, a GPU type given twice and a link given in both directions used to be
    accepted silently (the last one winning)."""
    assert old in TINY
    with pytest.raises(InputError, match=re.escape(words)) as ei:
        load_cluster("c.yaml", TINY.replace(old, new))
    assert (ei.value.field, ei.value.line) == (field, line)


def test_model_yaml_refuses_unknown_fields(tmp_path):
    from thunderkv.scheduler.model import load_model
    text = (EXAMPLES / "llama-30b.yaml").read_text()
    bad = tmp_path / "m.yaml"
    bad.write_text(text + "num_layers: 60\n")
    with pytest.raises(InputError, match="unknown field") as ei:
        load_model(str(bad))
    assert ei.value.field == "num_layers"
