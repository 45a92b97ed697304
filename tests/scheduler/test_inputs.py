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
    # `count: 100000000` (a typo) used to build 1e8 GPU names, tens of GB, before failing
    ("count: 2, intra_node_gbps: 200}\n  - {name: n1",
     "count: 100000000, intra_node_gbps: 200}\n  - {name: n1", "nodes[0].count", 8),
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


def test_an_empty_value_is_a_missing_field_not_a_parser_crash():
    """``network:`` with nothing after it is null: the field checks report it (the scalar
    was re-serialised to text and re-parsed, which raised yaml.ParserError)."""
    with pytest.raises(InputError, match="catalog: required field is missing"):
        load_cluster("c.yaml", "\nnetwork:\n")
    text = TINY.replace("  inter_node_gbps: 10\n", "  inter_node_gbps:\n")
    assert text != TINY
    with pytest.raises(InputError) as err:
        load_cluster("c.yaml", text)
    assert "network.inter_node_gbps" in str(err.value) and "c.yaml:" in str(err.value)

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
    with pytest.raises(InputError, match="unknown synthetic workload 'poetry'"):
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


# --- review fixes: non-finite numbers, shapes named by their field, node names ---------------
@pytest.mark.parametrize("old,new,field,line,words", [
    ("  inter_node_gbps: 10\n", "  inter_node_gbps: .inf\n", "network.inter_node_gbps", 12,
     "must be a finite number, got inf"),
    ("price_per_hour: 0.44", "price_per_hour: .inf", "catalog.L40S.price_per_hour", 6,
     "must be a finite number"),
    ("price_per_hour: 0.44", "price_per_hour: .nan", "catalog.L40S.price_per_hour", 6,
     "must be a finite number, got nan"),
    ("price_per_hour: 0.44", "price_per_hour: -1", "catalog.L40S.price_per_hour", 6,
     "must be >= 0, got -1"),
    ("{a: n0, b: n1, gbps: 25}", "{a: n0, b: n1, gbps: .nan}", "network.links[0].gbps", 14,
     "finite"),
    ("  L40S: {fp16_tflops: 362, mem_gb: 48, mem_bw_gbs: 864, price_per_hour: 0.44}",
     "  L40S: [362, 48]", "catalog.L40S", 6, "expected a mapping of GPU specs"),
    ("  - {name: n0, gpu: A6000, count: 2, intra_node_gbps: 200}", "  - n0", "nodes[0]", 8,
     "expected a mapping"),
    ("{name: n0,", '{name: "n0:x",', "nodes[0].name", 8, "only letters, digits"),
    ("{name: n0,", '{name: "n 0",', "nodes[0].name", 8, "only letters, digits"),
    ("{name: n0,", '{name: "[b]n0",', "nodes[0].name", 8, "only letters, digits"),
    ("{name: n0,", "{name: each,", "nodes[0].name", 8, "reserved (--fail each)"),
    ("  links:\n    - {a: n0, b: n1, gbps: 25}\n", "  links: {a: n0}\n", "network.links", 13,
     "expected a list"),
])
def test_bad_cluster_values_name_field_and_line(old, new, field, line, words):
    """Non-finite numbers (YAML .inf/.nan) used to be accepted (an inf price crashed the
    baseline sizing), a negative price had no file/line/field, a catalog entry or node of the
    wrong shape named a field inside it, and a ':' in a node name broke 'node:index' GPU ids."""
    assert old in TINY
    with pytest.raises(InputError, match=re.escape(words)) as ei:
        load_cluster("c.yaml", TINY.replace(old, new))
    assert (ei.value.field, ei.value.line) == (field, line)
    assert str(ei.value).startswith(f"c.yaml:{line}: {field}: ")


def test_prices_adding_up_to_infinity_are_refused():
    huge = TINY.replace("price_per_hour: 0.44", "price_per_hour: 1.0e+308")
    with pytest.raises(InputError, match="non-finite") as ei:
        load_cluster("c.yaml", huge)
    assert ei.value.field == "catalog"


def test_yaml_exponent_without_sign_gets_a_hint():
    """YAML 1.1 (PyYAML) reads 1e6 as a string: say how to write it."""
    with pytest.raises(InputError, match=re.escape("write 1.0e+6")) as ei:
        load_cluster("c.yaml", TINY.replace("mem_gb: 24,", "mem_gb: 24e0,"))
    assert ei.value.field == "catalog.RTX3090.mem_gb"


def test_model_yaml_refuses_non_finite(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text((EXAMPLES / "llama-30b.yaml").read_text().replace("layers: 60", "layers: .inf"))
    with pytest.raises(InputError, match="finite") as ei:
        load_model(str(bad))
    assert ei.value.field == "layers"


def test_readme_cluster_example_loads():
    """examples/planner/README.md's cluster YAML is the documented format: it must load (it
    once named an L40S its catalog did not define)."""
    text = (EXAMPLES / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks, "the README lost its cluster YAML example"
    c = load_cluster("README.md", blocks[0])
    assert {n.gpu for n in c.nodes} <= set(c.catalog) and len(c.gpus) == 8
    assert c.nic_bytes_per_s("l40s-0") == 100e9 / 8 and c.link_gbps("a6000-0", "l40s-0") == 25


# --- plan JSON: the same checks as the YAML, fields named inside the JSON ------------------
def _plan_doc() -> dict:
    """A hand-made, valid plan JSON document (llama-7b on TINY: A6000 prefill -> L40S
    decode), without running the planner."""
    from thunderkv.scheduler.costmodel import CostParams
    from thunderkv.scheduler.plan import Plan, PlanGroup, inputs_to_dict
    from thunderkv.scheduler.workload import SLO

    plan = Plan([PlanGroup("prefill", [("n0:0", "n0:1")], [32], 5.0),
                 PlanGroup("decode", [("n2:0", "n2:1")], [32], 5.0)],
                np.array([[2.0]]), [], 2.0)
    inputs = inputs_to_dict(load_cluster("tiny.yaml", TINY), PRESETS["llama-7b"], CostParams(),
                            SLO(1.5, 0.1))
    return {"plan": plan.to_dict(), "inputs": inputs,
            "workload": {"name": "coding", "requests": 200, "arrivals": "poisson",
                         "replay_seconds": 0.0, "seed": 0, "source": "synthetic:coding"}}


def _write(tmp_path, doc, text: str | None = None):
    import json

    path = tmp_path / "PLAN.json"
    path.write_text(json.dumps(doc) if text is None else text)
    return path


def test_hand_made_plan_json_loads(tmp_path):
    from thunderkv.scheduler.plan import load_plan_json

    doc, plan = load_plan_json(_write(tmp_path, _plan_doc()))
    assert plan.flow.tolist() == [[2.0]] and plan.objective == 2.0


def _set(path: str, value):
    """A mutation of the plan document: set ``a.b[0].c`` to ``value`` (``...``: delete it)."""
    def mutate(doc):
        keys = [int(k) if k.isdigit() else k for k in re.split(r"\.|\[|\]\.?", path) if k]
        cur = doc
        for k in keys[:-1]:
            cur = cur[k]
        if value is ...:
            del cur[keys[-1]]
        else:
            cur[keys[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate,field,words", [
    (_set("inputs.cluster.network.links[0].gbps", -4), "inputs.cluster.network.links[0].gbps",
     "must be > 0"),
    (_set("inputs.cluster.network.links[0].b", "zz"), "inputs.cluster.network.links[0].b",
     "unknown node 'zz'"),
    (_set("inputs.cluster.nodes[1].count", -4), "inputs.cluster.nodes[1].count", "must be > 0"),
    (_set("inputs.cluster.catalog.A6000.price_per_hour", float("nan")),
     "inputs.cluster.catalog.A6000.price_per_hour", "finite"),
    (_set("inputs.cluster.nodes[0].name", "n0:x"), "inputs.cluster.nodes[0].name", "letters"),
    (_set("inputs.model.ffn", ...), "inputs.model.ffn", "required field is missing"),
    (_set("inputs.slo.ttft", -1), "inputs.slo.ttft", "must be > 0"),
    (_set("inputs.cost_params.kv_bits", 3), "inputs.cost_params", "bits must be one of"),
    (_set("inputs.cost_params.mem_util", "lots"), "inputs.cost_params.mem_util",
     "expected a number"),
    (_set("plan.routing[0].req_per_s", -24.0), "plan.routing[0].req_per_s", "must be >= 0"),
    (_set("plan.routing[0].req_per_s", float("inf")), "plan.routing[0].req_per_s", "finite"),
    (_set("plan.routing[0].req_per_s", ...), "plan.routing[0].req_per_s",
     "required field is missing"),
    (_set("plan.routing[0].prefill", "0"), "plan.routing[0].prefill", "expected a number"),
    (_set("plan.routing", {"a": 1}), "plan.routing", "expected a list"),
    (_set("plan.routing[0]", [0, 1]), "plan.routing[0]", "expected an object"),
    (lambda d: d["plan"]["routing"].append(dict(d["plan"]["routing"][0])), "plan.routing[1]",
     "already routed by plan.routing[0]"),
    (_set("plan.groups", {}), "plan.groups", "non-empty list"),
    (_set("plan.groups[0].stages", ["n0:0"]), "plan.groups[0].stages[0]", "list of GPU ids"),
    (_set("plan.groups[0].layers", ["32"]), "plan.groups[0].layers", "layer counts"),
    (_set("plan.groups[0].phase", "decoding"), "plan.groups[0].phase", "must be one of"),
    (_set("plan", []), "plan", "expected an object"),
    (_set("workload", "abc"), "workload", "expected an object"),
    (_set("workload.requests", "many"), "workload.requests", "expected a number"),
    (_set("workload.arrivals", "bursty"), "workload.arrivals", "poisson or trace"),
    # memory feasibility: every GPU 1 GB -- the plan's groups no longer hold the model
    (lambda d: [c.__setitem__("mem_gb", 1) for c in d["inputs"]["cluster"]["catalog"].values()],
     "plan.groups[0]", "does not fit: stage 0 (2 x A6000 on n0, 32 layers)"),
])
def test_bad_plan_json_is_checked_like_the_yaml(tmp_path, mutate, field, words):
    """Plan JSON inputs used to skip the YAML loader's checks (negative/unknown links, any
    routing rate, memory that no longer holds the groups), and some hand edits raised
    KeyError/TypeError/AttributeError instead of naming the field."""
    from thunderkv.scheduler.plan import load_plan_json

    doc = _plan_doc()
    mutate(doc)
    with pytest.raises(InputError, match=re.escape(words)) as ei:
        load_plan_json(_write(tmp_path, doc))
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{tmp_path / 'PLAN.json'}: {field}: ")


def test_plan_json_routing_weight_may_be_huge_but_finite(tmp_path):
    from thunderkv.scheduler.plan import load_plan_json

    doc = _plan_doc()
    doc["plan"]["routing"][0]["req_per_s"] = 1e6  # a weight: normalised to the replay rate
    assert load_plan_json(_write(tmp_path, doc))[1].flow[0, 0] == 1e6


def test_plan_json_top_level_must_be_an_object(tmp_path):
    from thunderkv.scheduler.plan import load_plan_json

    with pytest.raises(InputError, match="expected a JSON object"):
        load_plan_json(_write(tmp_path, None, "[1, 2]"))


def test_cluster_from_dict_runs_the_yaml_checks():
    from thunderkv.scheduler.plan import cluster_from_dict, cluster_to_dict

    d = cluster_to_dict(load_cluster("tiny.yaml", TINY))
    assert cluster_from_dict(d).gpus == load_cluster("tiny.yaml", TINY).gpus
    d["network"]["inter_node_gbps"] = float("inf")
    with pytest.raises(InputError, match="finite") as ei:
        cluster_from_dict(d, "P.json")
    assert ei.value.field == "inputs.cluster.network.inter_node_gbps"


@pytest.mark.parametrize("mutate,words", [
    (_set("plan.routing[0].req_per_s", ...), "plan.routing[0].req_per_s: required field"),
    (_set("workload", "abc"), "workload: expected an object"),
    (_set("inputs.cluster.network.links[0].gbps", -4), "inputs.cluster.network.links[0].gbps"),
])
def test_cli_reports_a_bad_plan_json_in_one_line(tmp_path, capsys, mutate, words):
    from thunderkv.cli import main

    doc = _plan_doc()
    mutate(doc)
    path = str(_write(tmp_path, doc))
    assert main(["simulate", "--plan", path, "--rate", "1"]) == 2
    assert main(["plan", "--reschedule", path, "--fail", "n1", "--quiet"]) == 2
    err = "".join(capsys.readouterr().err.split())  # rich may wrap a long path anywhere
    assert err.count("".join(f"error: {path}: {words}".split())) == 2


def test_an_integer_too_large_for_a_float_is_refused_in_one_line():
    """``math.isfinite`` raises OverflowError for an int beyond any float: the loader says the
    field must be finite instead of crashing."""
    text = TINY.replace("inter_node_gbps: 10\n", "inter_node_gbps: 1" + "0" * 400 + "\n")
    assert text != TINY
    with pytest.raises(InputError, match="network.inter_node_gbps: must be a finite number"):
        load_cluster("c.yaml", text)


@pytest.mark.parametrize("loader,name,body", [
    (load_cluster, "c.yaml", TINY.encode().replace(b"name: n1", b"name: n\xe91")),  # latin-1
    (load_model, "m.yaml", b"layers: 60\nhidden: 6656\nheads: \xff52\n"),
    (load_azure_trace, "t.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n"
     b"2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.1,3\xff4,3\n"),
    (load_azure_trace, "t.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\r"  # old Mac
     b"2023-11-16 18:15:46.68,374,44\r2023-11-16 18:15:47.1,3\xff4,3\r"),
])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, loader, name, body):
    """A file saved in latin-1 (or binary junk) raised a bare UnicodeDecodeError message:
    no file, no line."""
    path = tmp_path / name
    path.write_bytes(body)
    head = body[:body.index(next(b for b in body if b > 0x7F).to_bytes(1, "big"))]
    want = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
    with pytest.raises(InputError) as ei:
        loader(path)
    assert ei.value.line == want
    assert str(ei.value).startswith(f"{path}:{want}: ") and "UTF-8" in str(ei.value)


def test_trace_saved_with_a_byte_order_mark_loads(tmp_path):
    """Spreadsheet programs save CSV as UTF-8 with a BOM: the header's first column read as
    '\\ufeffTIMESTAMP' and the trace was refused for a missing TIMESTAMP column."""
    f = tmp_path / "t.csv"
    f.write_bytes(b"\xef\xbb\xbfTIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                  b"2023-11-16 18:15:46.68,374,44\r\n2023-11-16 18:15:47.1,12,3\r\n")
    wl = load_azure_trace(f)
    assert list(wl.prompts) == [374, 12] and list(wl.outputs) == [44, 3]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_trace_lines_may_end_in_any_newline(tmp_path, eol):
    """A trace is read as bytes (to name the line of a byte that is not UTF-8); lines ending in
    a lone \\r (old Mac files), which binary reads do not split, still load."""
    f = tmp_path / "t.csv"
    f.write_bytes(eol.join([b"TIMESTAMP,ContextTokens,GeneratedTokens",
                            b"2023-11-16 18:15:46.68,374,44", b"2023-11-16 18:15:47.1,12,3", b""]))
    wl = load_azure_trace(f)
    assert list(wl.prompts) == [374, 12] and list(wl.outputs) == [44, 3]


@pytest.mark.parametrize("field,text", [("name", "name: [a, b]"), ("price_source", "price_source: {a: 1}")])
def test_a_text_field_given_a_list_or_mapping_is_refused_plainly(field, text):
    """``name: [a, b]`` was reported as ``got [Node(value='a', line=2), ...]`` (an internal
    repr), and ``price_source: [...]`` was accepted and written into the plan JSON as that
    repr."""
    with pytest.raises(InputError) as ei:
        load_cluster("c.yaml", TINY.replace("name: tiny", f"name: tiny\n{text}" if field != "name"
                                            else text))
    assert ei.value.field == field and ei.value.line == (2 if field == "name" else 3)
    assert "Node(" not in str(ei.value)


@pytest.mark.parametrize("old,new,field", [
    ("mem_gb: 24", "mem_gb: 1.0e+300", "catalog.RTX3090.mem_gb"),
    ("mem_bw_gbs: 936", "mem_bw_gbs: 1.0e+300", "catalog.RTX3090.mem_bw_gbs"),
    ("fp16_tflops: 71", "fp16_tflops: 1.0e+300", "catalog.RTX3090.fp16_tflops"),
])
def test_a_spec_too_large_to_convert_to_bytes_is_refused(old, new, field):
    """``mem_gb: 1.0e+300`` is finite, but x 1e9 bytes it is not: planning crashed with
    OverflowError (cannot convert float infinity to integer) in the layer split."""
    with pytest.raises(InputError) as ei:
        load_cluster("c.yaml", TINY.replace(old, new))
    assert ei.value.field == field and ei.value.line == 5


def test_trace_timestamps_with_utc_offsets_and_without(tmp_path, monkeypatch):
    """An offset (+05:00, +0500, Z) used to be refused as a bad timestamp (the fraction split
    swallowed it); a time without one is UTC, whatever the replaying machine's time zone (so
    a trace crossing a daylight-saving change does not jump by an hour)."""
    import time as time_module

    f = tmp_path / "t.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.5,10,1\n"            # naive: UTC
                 "2023-11-16 23:15:47.5+05:00,11,2\n"      # 18:15:47.5 UTC
                 "2023-11-16 13:15:48.5-0500,12,3\n"       # 18:15:48.5 UTC
                 "2023-11-16T18:15:49.5Z,13,4\n")
    monkeypatch.setenv("TZ", "America/New_York")
    time_module.tzset()
    try:
        wl = load_azure_trace(f)
    finally:
        monkeypatch.undo()
        time_module.tzset()
    assert list(wl.prompts) == [10, 11, 12, 13]
    assert np.allclose(np.diff(wl.arrivals), 1.0)


def test_a_cluster_beyond_the_planners_size_is_refused_naming_the_total():
    """Every node within the per-node cap, but far more GPUs in all than the planner takes."""
    from thunderkv.scheduler.cluster import MAX_CLUSTER_GPUS, MAX_NODE_GPUS

    nodes = "".join(f"  - {{name: s{i}, gpu: A6000, count: {MAX_NODE_GPUS}, "
                    "intra_node_gbps: 200}\n" for i in range(MAX_CLUSTER_GPUS // MAX_NODE_GPUS + 1))
    text = TINY[:TINY.index("nodes:\n") + len("nodes:\n")] + nodes + TINY[TINY.index("network:"):]
    text = text.replace("    - {a: n0, b: n1, gbps: 25}\n", "")
    with pytest.raises(InputError, match=f"GPUs in all: the planner takes at most {MAX_CLUSTER_GPUS}") as ei:
        load_cluster("c.yaml", text)
    assert ei.value.field == "nodes"


def test_only_newlines_end_trace_lines_and_only_the_first_byte_order_mark_goes(tmp_path):
    """Reading bytes and splitting them with str.splitlines() broke rows at form feeds and
    U+2028 inside a field, which csv (and open(newline="")) never did, and dropped a U+FEFF
    at the start of every line, not just the file's."""
    f = tmp_path / "t.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens,Note\n"
                 "2023-11-16 18:15:46.68,374,44,a\u2028b\x0cc\n"
                 "2023-11-16 18:15:47.1,12,3,x\n", encoding="utf-8")
    wl = load_azure_trace(f)
    assert list(wl.prompts) == [374, 12]
    f.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
                  b"\xef\xbb\xbf2023-11-16 18:15:47.1,12,3\n")
    with pytest.raises(InputError, match="bad timestamp") as ei:
        load_azure_trace(f)
    assert ei.value.line == 3


@pytest.mark.parametrize("stamp,utc", [
    ("2023-11-16 23:15:46.5+05", "2023-11-16 18:15:46.5"),
    ("2023-11-16 23:15:46+05", "2023-11-16 18:15:46"),
    ("2023-11-16 13:15:46.25-0500", "2023-11-16 18:15:46.25"),
])
def test_hour_only_and_compact_utc_offsets(stamp, utc):
    from thunderkv.scheduler.workload import _parse_ts

    assert _parse_ts(stamp) == _parse_ts(utc)


@pytest.mark.parametrize("stamp", ["2023-11-16 18:15:46+05:99", "2023-11-16 18:15:46.5+24:00"])
def test_an_impossible_utc_offset_is_refused(stamp):
    """+05:99 used to be read as +06:39."""
    from thunderkv.scheduler.workload import _parse_ts

    with pytest.raises(ValueError, match="bad UTC offset"):
        _parse_ts(stamp)
