"""GPU catalog, nodes and network: the cluster a plan runs on, loaded from YAML.

A GPU is named ``"node:index"`` (e.g. ``"node3:1"``). Bandwidths in the YAML are in Gbit/s;
everything in code is in bytes/s.

The network has two kinds of capacity: a *link* per pair of nodes (``inter_node_gbps``, or a
``links`` override; shared by both directions), and optionally a *NIC* per node (``nic_gbps``,
full duplex: that many Gbit/s out and as many in), which caps the sum of everything the node
sends or receives over all its links. Without ``nic_gbps`` a node may use every link at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .yamlio import Doc, load_yaml

# A node name: GPUs are "node:index" and --fail takes a comma list of them (or "each"), and the
# names appear in rich tables, so only letters, digits, '.', '_' and '-'.
NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
RESERVED_NODE_NAMES = ("each",)  # --fail each


def node_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a node (None: it can)."""
    if not NODE_NAME.fullmatch(name):
        return (f"node name {name!r} may hold only letters, digits, '.', '_' and '-' (GPUs are "
                "named 'node:index')")
    if name in RESERVED_NODE_NAMES:
        return f"node name {name!r} is reserved (--fail {name})"
    return None


@dataclass(slots=True, frozen=True)
class GpuType:
    """One catalog entry. ``compute_eff``/``mem_eff`` scale the datasheet peaks to achieved rates.

    ``layer_overhead_s`` / ``seq_overhead_s``: fixed seconds per layer per forward pass, and per
    layer per sequence of a decode batch (prefill counts one sequence) -- dispatch and Python
    overhead that no roofline captures. 0 (the default, GPUs) leaves every prediction unchanged;
    a CPU calibration (``thunderkv.serve.calibrate``) fits them.
    """

    name: str
    fp16_tflops: float
    mem_gb: float
    mem_bw_gbs: float
    price_per_hour: float
    compute_eff: float = 0.55
    mem_eff: float = 0.80
    layer_overhead_s: float = 0.0
    seq_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for f in ("fp16_tflops", "mem_gb", "mem_bw_gbs"):
            if not getattr(self, f) > 0:
                raise ValueError(f"GpuType {self.name}: {f} must be > 0")
        if not 0 <= self.price_per_hour < math.inf:
            raise ValueError(f"GpuType {self.name}: price_per_hour must be finite and >= 0")
        for f in ("compute_eff", "mem_eff"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"GpuType {self.name}: {f} must be in (0, 1]")
        for f in ("layer_overhead_s", "seq_overhead_s"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"GpuType {self.name}: {f} must be >= 0")

    @property
    def flops(self) -> float:
        """Achievable fp16 FLOP/s."""
        return self.fp16_tflops * 1e12 * self.compute_eff

    @property
    def bw(self) -> float:
        """Achievable memory bandwidth, bytes/s."""
        return self.mem_bw_gbs * 1e9 * self.mem_eff


MAX_NODE_GPUS = 1024  # GPUs per node (one NVLink/PCIe domain): real machines hold 8-72
MAX_CLUSTER_GPUS = 8192  # the planner is measured up to 320 GPUs (docs/planner.md); a typo such
#                          as `count: 100000000` would otherwise take tens of GB before failing


@dataclass(slots=True, frozen=True)
class NodeSpec:
    """A machine: ``count`` GPUs of one type joined by ``intra_node_gbps`` (NVLink or PCIe,
    one direction); ``nic_gbps``: its network card (each direction; None: the cluster's
    default, see :class:`Cluster`)."""

    name: str
    gpu: str
    count: int
    intra_node_gbps: float
    nic_gbps: float | None = None

    def __post_init__(self) -> None:
        problem = node_name_problem(self.name)
        if problem:
            raise ValueError(problem)
        if not 0 < self.count <= MAX_NODE_GPUS:
            raise ValueError(f"node {self.name}: count must be in 1..{MAX_NODE_GPUS}, got "
                             f"{self.count}")
        if self.intra_node_gbps <= 0:
            raise ValueError(f"node {self.name}: intra_node_gbps must be > 0")
        if self.nic_gbps is not None and not self.nic_gbps > 0:
            raise ValueError(f"node {self.name}: nic_gbps must be > 0")


@dataclass(slots=True)
class Cluster:
    """GPU types, nodes and the network between nodes (``nic_gbps``: the NIC of every node
    that names none; None: no NIC limit)."""

    catalog: dict[str, GpuType]
    nodes: list[NodeSpec]
    inter_node_gbps: float
    links: dict[tuple[str, str], float] = field(default_factory=dict)
    name: str = "cluster"
    price_source: str = ""
    nic_gbps: float | None = None
    gpus: list[str] = field(init=False)
    _node_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("cluster has no nodes")
        self._node_index = {}
        for i, n in enumerate(self.nodes):
            if n.name in self._node_index:
                raise ValueError(f"duplicate node name {n.name!r}")
            if n.gpu not in self.catalog:
                raise ValueError(f"node {n.name}: unknown gpu type {n.gpu!r}")
            self._node_index[n.name] = i
        if self.inter_node_gbps <= 0:
            raise ValueError("inter_node_gbps must be > 0")
        if self.nic_gbps is not None and not self.nic_gbps > 0:
            raise ValueError("nic_gbps must be > 0")
        total = sum(n.count for n in self.nodes)
        if total > MAX_CLUSTER_GPUS:
            raise ValueError(f"{total} GPUs in all: the planner takes at most {MAX_CLUSTER_GPUS}")
        self.gpus = [f"{n.name}:{i}" for n in self.nodes for i in range(n.count)]

    # --- lookups -------------------------------------------------------------------------
    def node_of(self, gpu: str) -> NodeSpec:
        return self.nodes[self._node_index[gpu.rsplit(":", 1)[0]]]

    def has_node(self, name: str) -> bool:
        return name in self._node_index

    def node_rank(self, name: str) -> int:
        return self._node_index[name]

    def gpu_type(self, gpu: str) -> GpuType:
        return self.catalog[self.node_of(gpu).gpu]

    def link_gbps(self, a: str, b: str) -> float:
        """Bandwidth between nodes ``a`` and ``b`` (node names), Gbit/s."""
        if a == b:
            return self.nodes[self._node_index[a]].intra_node_gbps
        return self.links.get((a, b), self.links.get((b, a), self.inter_node_gbps))

    def link_bytes_per_s(self, a: str, b: str) -> float:
        return self.link_gbps(a, b) * 1e9 / 8

    def nic_bytes_per_s(self, node: str) -> float | None:
        """Bytes/s node ``node`` can send (and, separately, receive) over all its links
        together; None when unlimited."""
        gbps = self.nodes[self._node_index[node]].nic_gbps
        gbps = self.nic_gbps if gbps is None else gbps
        return None if gbps is None else gbps * 1e9 / 8

    def price_per_hour(self, gpus: list[str] | None = None) -> float:
        """$/hour of ``gpus`` (default: the whole cluster)."""
        gpus = self.gpus if gpus is None else gpus
        return sum(self.gpu_type(g).price_per_hour for g in gpus)

    def without_nodes(self, names: set[str]) -> Cluster:
        """The same cluster minus the nodes in ``names`` (for failure events)."""
        keep = [n for n in self.nodes if n.name not in names]
        links = {k: v for k, v in self.links.items() if not (set(k) & names)}
        return Cluster(dict(self.catalog), keep, self.inter_node_gbps, links, self.name,
                       self.price_source, self.nic_gbps)


def load_cluster(path: str | Path, text: str | None = None) -> Cluster:
    """Load a cluster YAML (see ``examples/planner/README.md``); errors name field and line."""
    return cluster_from_doc(load_yaml(path, text))


def cluster_from_data(data: Any, source: str, prefix: str = "") -> Cluster:
    """A cluster from parsed data (a plan JSON's ``inputs.cluster``) through the same checks
    as the YAML, errors naming ``prefix.field``."""
    return cluster_from_doc(Doc.from_data(data, source, prefix))


def cluster_from_doc(doc: Doc) -> Cluster:
    """The cluster of a YAML/JSON document: every field checked, errors naming field and line."""
    doc.mapping(doc.root, "", "a mapping with catalog, nodes and network")
    doc.check_keys(("name", "price_source", "catalog", "nodes", "network"))
    cat_node = doc.node("catalog")
    if not isinstance(cat_node.value, dict) or not cat_node.value:
        raise doc.error("catalog", "expected a non-empty mapping of GPU type -> specs", cat_node.line)
    catalog: dict[str, GpuType] = {}
    for name, spec in cat_node.value.items():
        p = f"catalog.{name}"
        doc.mapping(spec, p, "a mapping of GPU specs (fp16_tflops, mem_gb, ...)")
        doc.check_keys(_GPU_FIELDS, spec, p)
        catalog[name] = GpuType(
            name=name,
            fp16_tflops=_spec(doc, spec, p, "fp16_tflops", 1e12),
            mem_gb=_spec(doc, spec, p, "mem_gb", 1e9),
            mem_bw_gbs=_spec(doc, spec, p, "mem_bw_gbs", 1e9),
            price_per_hour=doc.number("price_per_hour", spec, label=f"{p}.price_per_hour",
                                      positive=False, minimum=0),
            compute_eff=_eff(doc, spec, f"{p}.compute_eff", "compute_eff", 0.55),
            mem_eff=_eff(doc, spec, f"{p}.mem_eff", "mem_eff", 0.80),
            layer_overhead_s=_overhead(doc, spec, f"{p}.layer_overhead_s", "layer_overhead_s"),
            seq_overhead_s=_overhead(doc, spec, f"{p}.seq_overhead_s", "seq_overhead_s"),
        )
    nodes_node = doc.node("nodes")
    if not isinstance(nodes_node.value, list) or not nodes_node.value:
        raise doc.error("nodes", "expected a non-empty list of nodes", nodes_node.line)
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(nodes_node.value):
        p = f"nodes[{i}]"
        doc.mapping(item, p, "a mapping {name, gpu, count, intra_node_gbps}")
        doc.check_keys(_NODE_FIELDS, item, p)
        name = doc.string("name", item, label=f"{p}.name")
        problem = node_name_problem(name)
        if problem:
            raise doc.error(f"{p}.name", problem, doc.node("name", item).line)
        if name in seen:
            raise doc.error(f"{p}.name", f"duplicate node name {name!r}", item.line)
        seen.add(name)
        gpu = doc.string("gpu", item, label=f"{p}.gpu")
        if gpu not in catalog:
            raise doc.error(f"{p}.gpu", f"unknown GPU type {gpu!r} (catalog has {sorted(catalog)})",
                            doc.node("gpu", item).line)
        count = int(doc.number("count", item, label=f"{p}.count", integer=True))
        if count > MAX_NODE_GPUS:
            raise doc.error(f"{p}.count", f"at most {MAX_NODE_GPUS} GPUs per node (one "
                            f"NVLink/PCIe domain; list a larger site as several nodes), got "
                            f"{count}", doc.node("count", item).line)
        intra = doc.number("intra_node_gbps", item, label=f"{p}.intra_node_gbps")
        nic = doc.number("nic_gbps", item, label=f"{p}.nic_gbps", optional=True)
        nodes.append(NodeSpec(name, gpu, count, intra, nic))
    total = sum(n.count for n in nodes)
    if total > MAX_CLUSTER_GPUS:
        raise doc.error("nodes", f"{total} GPUs in all: the planner takes at most "
                        f"{MAX_CLUSTER_GPUS}", nodes_node.line)
    net = doc.node("network")
    doc.mapping(net, "network", "a mapping with inter_node_gbps")
    doc.check_keys(("inter_node_gbps", "nic_gbps", "links"), net, "network")
    inter = doc.number("network.inter_node_gbps")
    nic_default = doc.number("network.nic_gbps", optional=True)
    links: dict[tuple[str, str], float] = {}
    link_where: dict[tuple[str, str], str] = {}  # pair -> where it was first given
    links_node = doc.node("network.links", default=None)
    if links_node is not None and links_node.value is not None:
        if not isinstance(links_node.value, list):
            raise doc.error("network.links", "expected a list", links_node.line)
        for i, item in enumerate(links_node.value):
            p = f"network.links[{i}]"
            doc.mapping(item, p, "a mapping {a, b, gbps}")
            doc.check_keys(("a", "b", "gbps"), item, p)
            a, b = doc.string("a", item, label=f"{p}.a"), doc.string("b", item, label=f"{p}.b")
            for end, v in (("a", a), ("b", b)):
                if v not in seen:
                    raise doc.error(f"{p}.{end}", f"unknown node {v!r}", doc.node(end, item).line)
            if a == b:
                raise doc.error(p, "a link must join two different nodes", item.line)
            if (a, b) in links or (b, a) in links:  # links are undirected: one entry per pair
                first = link_where[(a, b) if (a, b) in links else (b, a)]
                raise doc.error(p, f"the link {a} - {b} is already given {first}", item.line)
            links[(a, b)] = doc.number("gbps", item, label=f"{p}.gbps")
            link_where[(a, b)] = f"on line {item.line}" if item.line is not None else f"as {p}"
    name = doc.string("name", default="cluster")
    src = doc.node("price_source", default=None)
    if src is not None and isinstance(src.value, (list, dict)):
        raise doc.error("price_source", f"expected text, got a {type(src.value).__name__}",
                        src.line)
    cluster = Cluster(catalog, nodes, inter, links, name,
                      "" if src is None or src.value is None else str(src.value), nic_default)
    if not math.isfinite(cluster.price_per_hour()):  # each price finite, the sum too big
        raise doc.error("catalog", "the prices add up to a non-finite $/hour", cat_node.line)
    return cluster


# the YAML fields of a catalog entry and of a node: the dataclasses' own (a GPU type's name is
# its catalog key)
_GPU_FIELDS = tuple(f.name for f in dataclasses.fields(GpuType) if f.name != "name")
_NODE_FIELDS = tuple(f.name for f in dataclasses.fields(NodeSpec))


def _spec(doc: Doc, spec, prefix: str, key: str, unit: float) -> float:
    """A datasheet figure (> 0) that stays finite in the cost model's units (``unit``: 1e9 for
    GB, 1e12 for TFLOP/s): ``mem_gb: 1.0e+300`` is a finite number but infinite bytes."""
    v = doc.number(key, spec, label=f"{prefix}.{key}")
    if not math.isfinite(v * unit):
        raise doc.error(f"{prefix}.{key}", f"too large, got {v!r}", doc.node(key, spec).line)
    return v


def _eff(doc: Doc, spec, label: str, key: str, default: float) -> float:
    v = doc.number(key, spec, label=label, default=default)
    if not 0 < v <= 1:
        raise doc.error(label, f"must be in (0, 1], got {v}", doc.node(key, spec).line)
    return v


def _overhead(doc: Doc, spec, label: str, key: str) -> float:
    return doc.number(key, spec, label=label, default=0.0, positive=False, minimum=0)
