"""A deployment plan: GPU groups (phase, stages, layer split), routing, and its JSON form."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cluster import Cluster, GpuType, cluster_from_data, cluster_from_doc
from .costmodel import CostParams, Pipeline, build_pipeline
from .errors import InputError
from .model import ModelSpec, model_from_doc
from .workload import SLO
from .yamlio import Doc, Node, shorten, strip

PHASES = ("prefill", "decode", "colocated")


@dataclass(slots=True)
class PlanGroup:
    """One model replica: its GPUs as pipeline stages (each a TP set on one node) and phase."""

    phase: str
    stage_gpus: list[tuple[str, ...]]
    layers: list[int]
    capacity: float = 0.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"bad phase {self.phase!r}")
        if len(self.stage_gpus) != len(self.layers) or not self.layers:
            raise ValueError("one layer count per stage required")

    @property
    def gpus(self) -> list[str]:
        return [g for s in self.stage_gpus for g in s]

    @property
    def tp(self) -> int | list[int]:
        tps = [len(s) for s in self.stage_gpus]
        return tps[0] if len(set(tps)) == 1 else tps

    def pipeline(self, cluster: Cluster, model: ModelSpec, params: CostParams) -> Pipeline:
        return build_pipeline(cluster, model, params, self.stage_gpus, self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "phase": self.phase, "tp": self.tp, "pp": len(self.layers),
                "layers": self.layers, "stages": [list(s) for s in self.stage_gpus],
                "capacity_req_per_s": round(self.capacity, 4)}


@dataclass(slots=True)
class Plan:
    """Groups plus routing ``flow[i][j]`` (req/s) from prefill group i to decode group j
    (indices into :attr:`prefill_ids` / :attr:`decode_ids`); colocated groups get ``coloc_flow``."""

    groups: list[PlanGroup]
    flow: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    coloc_flow: list[float] = field(default_factory=list)
    objective: float = 0.0

    @property
    def prefill_ids(self) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g.phase == "prefill"]

    @property
    def decode_ids(self) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g.phase == "decode"]

    @property
    def coloc_ids(self) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g.phase == "colocated"]

    def gpus(self) -> list[str]:
        return [g for grp in self.groups for g in grp.gpus]

    def routing_dicts(self) -> list[dict[str, Any]]:
        total = float(self.flow.sum()) + float(sum(self.coloc_flow))
        out = []
        for a, i in enumerate(self.prefill_ids):
            for b, j in enumerate(self.decode_ids):
                if self.flow[a, b] > 1e-9:  # unrounded: the simulator splits by these weights
                    out.append({"prefill": i, "decode": j, "req_per_s": float(self.flow[a, b]),
                                "fraction": round(float(self.flow[a, b]) / total, 4)})
        for a, i in enumerate(self.coloc_ids):
            if self.coloc_flow[a] > 1e-9:
                out.append({"prefill": i, "decode": i, "req_per_s": float(self.coloc_flow[a]),
                            "fraction": round(self.coloc_flow[a] / total, 4)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "routing": self.routing_dicts(),
                "objective_req_per_s": float(self.objective)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> Plan:
        """The plan of a plan JSON's ``plan`` section; every field checked, errors naming it
        (``plan.routing[0].req_per_s``)."""
        doc = Doc.from_data(d, source, "plan")
        doc.mapping(doc.root, "", "an object with groups and routing")
        groups_node = doc.node("groups")
        if not isinstance(groups_node.value, list) or not groups_node.value:
            raise doc.error("groups", "expected a non-empty list of groups")
        groups = [_group_from(doc, g, f"groups[{i}]") for i, g in enumerate(groups_node.value)]
        plan = cls(groups)
        pid, did, cid = plan.prefill_ids, plan.decode_ids, plan.coloc_ids
        plan.flow = np.zeros((len(pid), len(did)))
        plan.coloc_flow = [0.0] * len(cid)
        routing = doc.node("routing", default=None)
        entries = [] if routing is None or routing.value is None else routing.value
        if not isinstance(entries, list):
            raise doc.error("routing", f"expected a list of {{prefill, decode, req_per_s}} entries, "
                            f"got {type(entries).__name__}")
        first: dict[tuple[int, int], int] = {}
        for k, r in enumerate(entries):
            p = f"routing[{k}]"
            doc.mapping(r, p, "an object {prefill, decode, req_per_s}")
            i, j = (int(doc.number(key, r, label=f"{p}.{key}", integer=True, positive=False,
                                   minimum=0)) for key in ("prefill", "decode"))
            # a weight: any finite rate >= 0 (the routing is normalised to the replay rate)
            rate = float(doc.number("req_per_s", r, label=f"{p}.req_per_s", positive=False,
                                    minimum=0))
            if (i, j) in first:
                raise doc.error(p, f"the pair prefill {i} -> decode {j} is already routed by "
                                f"plan.routing[{first[i, j]}]")
            first[i, j] = k
            if i == j and i in cid:
                plan.coloc_flow[cid.index(i)] = rate
            elif i in pid and j in did:
                plan.flow[pid.index(i), did.index(j)] = rate
            else:
                raise doc.error(p, f"prefill {i} -> decode {j} names no prefill/decode group pair "
                                "(nor one colocated group twice)")
            if rate > 0 and (all(n == 0 for n in groups[i].layers)
                             or all(n == 0 for n in groups[j].layers)):
                raise doc.error(f"{p}.req_per_s", "routes requests to an unused group "
                                "(all its layers 0)")
        objective = doc.number("objective_req_per_s", label="objective_req_per_s", optional=True,
                               positive=False, minimum=0)
        plan.objective = (float(objective) if objective is not None
                          else float(plan.flow.sum() + sum(plan.coloc_flow)))
        return plan


def _group_from(doc: Doc, g: Node, p: str) -> PlanGroup:
    """One ``plan.groups[i]`` entry, checked."""
    doc.mapping(g, p, "an object {phase, stages, layers}")
    phase = doc.string("phase", g, label=f"{p}.phase")
    if phase not in PHASES:
        raise doc.error(f"{p}.phase", f"must be one of {', '.join(PHASES)}, got {phase!r}")
    stages_node = doc.node("stages", g, label=f"{p}.stages")
    if not isinstance(stages_node.value, list) or not stages_node.value:
        raise doc.error(f"{p}.stages", "expected a non-empty list of stages (lists of GPU ids)")
    stages = []
    for st, s in enumerate(stages_node.value):
        if not isinstance(s.value, list) or not all(isinstance(x.value, str) for x in s.value):
            raise doc.error(f"{p}.stages[{st}]", f"expected a list of GPU ids ('node:index'), got "
                            f"{shorten(repr(strip(s)))}")
        stages.append(tuple(x.value for x in s.value))
    layers_node = doc.node("layers", g, label=f"{p}.layers")
    layers = strip(layers_node)
    if (not isinstance(layers, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layers)):
        raise doc.error(f"{p}.layers", f"expected a list of layer counts (integers >= 0), got "
                        f"{shorten(repr(layers))}")
    if len(layers) != len(stages):
        raise doc.error(f"{p}.layers", f"{len(layers)} layer counts for {len(stages)} stages "
                        "(one per stage)")
    cap = doc.number("capacity_req_per_s", g, label=f"{p}.capacity_req_per_s", default=0.0,
                     positive=False, minimum=0)
    return PlanGroup(phase, stages, layers, float(cap))


# --- serialising the inputs, so a plan JSON is self-contained ---------------------------------
def cluster_to_dict(c: Cluster) -> dict[str, Any]:
    return {"name": c.name, "price_source": c.price_source,
            "catalog": {k: _gpu_type_dict(v) for k, v in c.catalog.items()},
            "nodes": [dataclasses.asdict(n) for n in c.nodes],
            "network": {"inter_node_gbps": c.inter_node_gbps, "nic_gbps": c.nic_gbps,
                        "links": [{"a": a, "b": b, "gbps": v} for (a, b), v in c.links.items()]}}


def _gpu_type_dict(g: GpuType) -> dict[str, Any]:
    """Catalog entry fields; the overhead knobs only when set (plans without them read as before)."""
    return {f.name: getattr(g, f.name) for f in dataclasses.fields(g)
            if f.name != "name" and not (f.name in _OPTIONAL_ZERO and getattr(g, f.name) == 0)}


_OPTIONAL_ZERO = ("layer_overhead_s", "seq_overhead_s")


def cluster_from_dict(d: dict[str, Any], source: str = "plan",
                      prefix: str = "inputs.cluster") -> Cluster:
    """The cluster a plan JSON records, through the cluster YAML's checks (errors name
    ``prefix.field``, e.g. ``inputs.cluster.network.links[0].gbps``)."""
    return cluster_from_data(d, source, prefix)


def inputs_to_dict(cluster: Cluster, model: ModelSpec, params: CostParams, slo: SLO) -> dict:
    return {"cluster": cluster_to_dict(cluster), "model": dataclasses.asdict(model),
            "cost_params": dataclasses.asdict(params), "slo": dataclasses.asdict(slo)}


def inputs_from_dict(d: dict[str, Any], source: str = "plan"
                     ) -> tuple[Cluster, ModelSpec, CostParams, SLO]:
    """A plan JSON's ``inputs`` (cluster, model, cost parameters, SLO), every field checked;
    errors name ``inputs.<field>``."""
    doc = Doc.from_data(d, source, "inputs")
    doc.mapping(doc.root, "", "an object with cluster, model, cost_params and slo")
    cluster = cluster_from_doc(Doc(doc.node("cluster"), source, "inputs.cluster"))
    model = model_from_doc(Doc(doc.node("model"), source, "inputs.model"), "model")
    return cluster, model, _cost_params(doc), _slo(doc)


def _cost_params(doc: Doc) -> CostParams:
    node = doc.node("cost_params")
    doc.mapping(node, "cost_params", "an object of cost-model knobs")
    fields = {f.name: f.default for f in dataclasses.fields(CostParams)}
    doc.check_keys(tuple(fields), node, "cost_params")
    vals: dict[str, Any] = {}
    for key, default in fields.items():
        label = f"cost_params.{key}"
        if isinstance(default, bool):
            v = doc.node(key, node, default=None)
            if v is not None and not isinstance(v.value, bool):
                raise doc.error(label, f"expected true or false, got {shorten(repr(v.value))}")
            vals[key] = default if v is None else v.value
        else:
            vals[key] = doc.number(key, node, label=label, default=default, positive=False,
                                   minimum=0, integer=isinstance(default, int))
    try:
        return CostParams(**vals)
    except ValueError as exc:
        raise doc.error("cost_params", str(exc)) from exc


def _slo(doc: Doc) -> SLO:
    node = doc.node("slo")
    doc.mapping(node, "slo", "an object {ttft, tpot}")
    doc.check_keys(("ttft", "tpot"), node, "slo")
    return SLO(doc.number("ttft", node, label="slo.ttft"), doc.number("tpot", node, label="slo.tpot"))


# what a plan JSON's ``workload`` may record (read back by ``--reschedule`` and ``simulate``)
_WORKLOAD_NUMBERS = {"requests": (True, 10), "seed": (True, 0), "replay_seconds": (False, 0)}


def check_workload(d: Any, source: str = "plan") -> None:
    """Raise :class:`InputError` naming ``workload.<field>`` unless the plan JSON's recorded
    workload can be replayed (null or absent fields fall back to the flags' defaults)."""
    doc = Doc.from_data(d, source, "workload")
    doc.mapping(doc.root, "", "an object (the workload the plan was made for)")
    for key, (integer, least) in _WORKLOAD_NUMBERS.items():
        doc.number(key, label=key, optional=True, integer=integer, positive=False, minimum=least)
    arrivals = doc.node("arrivals", default=None)
    if arrivals is not None and arrivals.value is not None \
            and arrivals.value not in ("poisson", "trace"):
        raise doc.error("arrivals", f"must be poisson or trace, got {shorten(repr(arrivals.value))}")
    src = doc.node("source", default=None)
    if src is not None and src.value is not None and not isinstance(src.value, str):
        raise doc.error("source", f"expected a trace path or synthetic:KIND, got "
                        f"{shorten(repr(src.value))}")


def load_plan_json(path: str | Path) -> tuple[dict[str, Any], Plan]:
    """Read a plan JSON written by ``thunderkv plan``: (whole document, plan). Every part a
    replay reads is checked (the plan, its inputs, the recorded workload), as is that each
    group's weights still fit its GPUs."""
    source = str(path)
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", source=source) from exc
    except UnicodeDecodeError as exc:
        raise InputError("not a text file (expected a plan JSON)", source=source) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", source=source, line=exc.lineno) from exc
    if not isinstance(doc, dict):
        raise InputError(f"expected a JSON object (a plan from `thunderkv plan --json`), got "
                         f"{type(doc).__name__}", source=source)
    for key in ("plan", "inputs"):
        if key not in doc:
            raise InputError("required key missing", source=source, field=key)
    plan = Plan.from_dict(doc["plan"], source)
    cluster, model, params, _ = inputs_from_dict(doc["inputs"], source)
    if "workload" in doc:
        check_workload(doc["workload"], source)
    check_plan(plan, cluster, model, doc["plan"], source, params)
    return doc, plan


def check_plan(plan: Plan, cluster: Cluster, model: ModelSpec, raw: dict[str, Any] | None = None,
               source: str = "plan", params: CostParams | None = None) -> None:
    """Raise :class:`InputError` unless every stage is GPUs of one node of ``cluster`` (each GPU
    used once in the plan), the layer counts are positive and add up to the model's (all 0:
    a group the planner left unused), the
    JSON's derived fields (``gpus``, ``tp``, ``pp``), where given, agree with the stages, and
    (given ``params``) each used group's weights fit its GPUs' memory."""
    seen: dict[str, int] = {}
    known = set(cluster.gpus)
    groups = (raw or {}).get("groups", [{}] * len(plan.groups))
    for i, (g, d) in enumerate(zip(plan.groups, groups)):
        where = f"plan.groups[{i}]"

        def bad(msg: str, field: str = where) -> InputError:
            return InputError(msg, source=source, field=field)

        for st, gs in enumerate(g.stage_gpus):
            if not gs:
                raise bad("empty stage", f"{where}.stages[{st}]")
            for gpu in gs:
                if gpu not in known:
                    raise bad(f"GPU {gpu!r} is not in the cluster", f"{where}.stages[{st}]")
                if gpu in seen:
                    raise bad(f"GPU {gpu!r} is also used by group {seen[gpu]}", f"{where}.stages[{st}]")
                seen[gpu] = i
            if len({x.rpartition(":")[0] for x in gs}) != 1:
                raise bad(f"stage {list(gs)} spans nodes (a stage is one node's GPUs)",
                          f"{where}.stages[{st}]")
        idle = all(n == 0 for n in g.layers)  # a group the planner found infeasible: unused
        if not idle and (any(not isinstance(n, int) or n < 1 for n in g.layers)
                         or sum(g.layers) != model.layers):
            raise bad(f"layers {g.layers} must be positive and add up to the model's "
                      f"{model.layers} (or all 0: an unused group)", f"{where}.layers")
        for key, want in (("gpus", g.gpus), ("tp", g.tp), ("pp", len(g.layers))):
            if key in d and d[key] != want:
                raise bad(f"{key} {d[key]!r} disagrees with the stages ({want!r})", f"{where}.{key}")
        if params is not None and not idle:
            problem = _memory_problem(g.pipeline(cluster, model, params))
            if problem:
                raise bad(problem)


def _memory_problem(pipe: Pipeline) -> str | None:
    """Why the replica ``pipe`` cannot run: a stage whose weights leave no room for even one
    token of KV cache (None: it fits)."""
    p = pipe.p
    for i, s in enumerate(pipe.stages):
        usable = s.gpu.mem_gb * 1e9 * p.mem_util - p.reserve_gb * 1e9
        need = pipe.weight_bytes(i) + pipe.model.kv_bytes_per_token(s.layers) / s.tp
        if need > usable:
            return (f"does not fit: stage {i} ({s.tp} x {s.gpu.name} on {s.node}, {s.layers} "
                    f"layers) needs {pipe.weight_bytes(i) / 1e9:.3g} GB of weights per GPU, "
                    f"{max(usable, 0) / 1e9:.3g} GB usable (mem_gb {s.gpu.mem_gb:g} x mem_util "
                    f"{p.mem_util:g} - reserve {p.reserve_gb:g} GB)")
    return None
