"""A deployment plan: GPU groups (phase, stages, layer split), routing, and its JSON form."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cluster import Cluster, GpuType, NodeSpec
from .costmodel import CostParams, Pipeline, build_pipeline
from .errors import InputError
from .model import ModelSpec
from .workload import SLO


@dataclass(slots=True)
class PlanGroup:
    """One model replica: its GPUs as pipeline stages (each a TP set on one node) and phase."""

    phase: str
    stage_gpus: list[tuple[str, ...]]
    layers: list[int]
    capacity: float = 0.0

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode", "colocated"):
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
                if self.flow[a, b] > 1e-9:
                    out.append({"prefill": i, "decode": j, "req_per_s": round(float(self.flow[a, b]), 4),
                                "fraction": round(float(self.flow[a, b]) / total, 4)})
        for a, i in enumerate(self.coloc_ids):
            if self.coloc_flow[a] > 1e-9:
                out.append({"prefill": i, "decode": i, "req_per_s": round(self.coloc_flow[a], 4),
                            "fraction": round(self.coloc_flow[a] / total, 4)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "routing": self.routing_dicts(),
                "objective_req_per_s": round(self.objective, 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> Plan:
        try:
            groups = [PlanGroup(g["phase"], [tuple(s) for s in g["stages"]], list(g["layers"]),
                                float(g.get("capacity_req_per_s", 0.0))) for g in d["groups"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad plan group ({exc})", source=source, field="plan.groups") from exc
        plan = cls(groups)
        pid, did, cid = plan.prefill_ids, plan.decode_ids, plan.coloc_ids
        plan.flow = np.zeros((len(pid), len(did)))
        plan.coloc_flow = [0.0] * len(cid)
        for r in d.get("routing", []):
            i, j = r["prefill"], r["decode"]
            if i == j and i in cid:
                plan.coloc_flow[cid.index(i)] = r["req_per_s"]
            elif i in pid and j in did:
                plan.flow[pid.index(i), did.index(j)] = r["req_per_s"]
            else:
                raise InputError(f"routing entry {r} names no prefill/decode pair", source=source,
                                 field="plan.routing")
        plan.objective = float(d.get("objective_req_per_s", plan.flow.sum() + sum(plan.coloc_flow)))
        return plan


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


def cluster_from_dict(d: dict[str, Any]) -> Cluster:
    cat = {k: GpuType(name=k, **v) for k, v in d["catalog"].items()}
    nodes = [NodeSpec(**n) for n in d["nodes"]]
    links = {(x["a"], x["b"]): x["gbps"] for x in d["network"].get("links", [])}
    return Cluster(cat, nodes, d["network"]["inter_node_gbps"], links, d.get("name", "cluster"),
                   d.get("price_source", ""), d["network"].get("nic_gbps"))


def inputs_to_dict(cluster: Cluster, model: ModelSpec, params: CostParams, slo: SLO) -> dict:
    return {"cluster": cluster_to_dict(cluster), "model": dataclasses.asdict(model),
            "cost_params": dataclasses.asdict(params), "slo": dataclasses.asdict(slo)}


def inputs_from_dict(d: dict[str, Any]) -> tuple[Cluster, ModelSpec, CostParams, SLO]:
    return (cluster_from_dict(d["cluster"]), ModelSpec(**d["model"]),
            CostParams(**d["cost_params"]), SLO(**d["slo"]))


def load_plan_json(path: str | Path) -> tuple[dict[str, Any], Plan]:
    """Read a plan JSON written by ``thunderkv plan``: (whole document, plan)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", source=str(path)) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", source=str(path), line=exc.lineno) from exc
    for key in ("plan", "inputs"):
        if key not in doc:
            raise InputError("required key missing", source=str(path), field=key)
    plan = Plan.from_dict(doc["plan"], str(path))
    try:
        cluster, model, _, _ = inputs_from_dict(doc["inputs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"bad inputs ({exc})", source=str(path), field="inputs") from exc
    check_plan(plan, cluster, model, doc["plan"], str(path))
    return doc, plan


def check_plan(plan: Plan, cluster: Cluster, model: ModelSpec, raw: dict[str, Any] | None = None,
               source: str = "plan") -> None:
    """Raise :class:`InputError` unless every stage is GPUs of one node of ``cluster`` (each GPU
    used once in the plan), the layer counts are positive and add up to the model's (all 0:
    a group the planner left unused), and the
    JSON's derived fields (``gpus``, ``tp``, ``pp``), where given, agree with the stages."""
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
