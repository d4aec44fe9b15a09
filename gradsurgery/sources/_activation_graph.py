"""The autograd graph of the T losses: which task reaches which parameter, and which parameter uses go
through a recorded supported-module call.

One walk over the graph (nodes reachable from the losses' ``grad_fn``) gives every node's children and
parents; one pass in topological order propagates a bitmask of the tasks that reach each node (a parameter
is reached by task i when its ``AccumulateGrad`` node carries bit i, exactly the parameters for which
``autograd.grad(L_i, p)`` is not None). Cost: O(nodes + edges) Python steps, a fraction of a microsecond
each, against the backward passes' tensor work.

A recorded call's *region* is the set of nodes created by the call: from its output edge's node down to the
nodes of its differentiable inputs and the AccumulateGrad nodes (all excluded). The region is trusted only
when it has a single entry: every region node other than the output node has all its parents inside the
region. Then any gradient reaching the call's parameters through the region flows in through the output
edge, and ∂L/∂(output) determines the parameters' gradient from that call. A parameter is *covered* when
every consumer of its AccumulateGrad node lies in the region of a recorded call of a module that holds it;
any other use (``F.linear(h, embedding.weight)``, an unsupported op, an in-place rebase around the output
edge) leaves it uncovered, and it takes the exact per-parameter path. Nothing is guessed from module types
or names: the decision reads the graph.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from ._activation_record import Record, Registry

#: a region larger than this is not a single module call (a missed stop would walk the upstream graph)
MAX_REGION = 64
ACCUMULATE = "AccumulateGrad"


@dataclass
class Graph:
    nodes: list[Any]
    index: dict[Any, int]
    children: list[list[int]]
    parents: list[list[int]]
    masks: list[int]  # per node: bit i set when task i reaches it
    param_node: dict[int, int]  # param position → its AccumulateGrad node
    found: list[tuple[Record, int]]  # (record, index of its output node), in graph order


def walk(roots: list[Any], param_pos: dict[int, int], registry: Registry) -> Graph:
    """Walk the graph from ``roots`` (one node per task); ``param_pos`` maps id(parameter) → position."""
    index: dict[Any, int] = {}
    nodes: list[Any] = []
    children: list[list[int]] = []
    param_node: dict[int, int] = {}
    found: list[tuple[Record, int]] = []
    stack: list[Any] = []

    def add(node: Any) -> int:
        k = len(nodes)
        index[node] = k
        nodes.append(node)
        children.append([])
        if type(node).__name__ == ACCUMULATE:
            pos = param_pos.get(id(node.variable))
            if pos is not None:
                param_node[pos] = k
        else:
            stack.append(node)
            for rec in registry.find(node):
                found.append((rec, k))
        return k

    for root in roots:
        if root not in index:
            add(root)
    while stack:
        node = stack.pop()
        kids = children[index[node]]
        for child, _ in node.next_functions:
            if child is None:
                continue
            k = index.get(child)
            if k is None:
                k = add(child)
            kids.append(k)
    parents: list[list[int]] = [[] for _ in nodes]
    indegree = [0] * len(nodes)
    for k, kids in enumerate(children):
        for c in kids:
            parents[c].append(k)
            indegree[c] += 1
    masks = [0] * len(nodes)
    for i, root in enumerate(roots):
        masks[index[root]] |= 1 << i
    # Kahn's order: a node's mask is final once every parent has passed its own on.
    queue = deque(k for k in range(len(nodes)) if indegree[k] == 0)
    while queue:
        k = queue.popleft()
        m = masks[k]
        for c in children[k]:
            masks[c] |= m
            indegree[c] -= 1
            if indegree[c] == 0:
                queue.append(c)
    return Graph(nodes, index, children, parents, masks, param_node, found)


def region(graph: Graph, record: Record, entry: int) -> set[int] | None:
    """The nodes of one recorded call (see the module docstring), or None when it is not a single-entry
    region of at most ``MAX_REGION`` nodes (the call's parameters then take the per-parameter path)."""
    stops = {graph.index[s] for s in record.stops if s in graph.index}
    inside = {entry}
    todo = [entry]
    while todo:
        k = todo.pop()
        for c in graph.children[k]:
            if c in inside or c in stops or type(graph.nodes[c]).__name__ == ACCUMULATE:
                continue
            inside.add(c)
            if len(inside) > MAX_REGION:
                return None
            todo.append(c)
    for k in inside:
        if k != entry and any(p not in inside for p in graph.parents[k]):
            return None
    return inside


@dataclass
class Coverage:
    uses: dict[int, list[tuple[Record, int, str]]]  # covered param position → [(record, entry, role)]
    uncovered: dict[int, list[int]]  # param position → its consumer nodes outside every trusted region


def coverage(graph: Graph, candidates: set[int], params: list[Any]) -> Coverage:
    """Which of the ``candidates`` (param positions) are covered by recorded calls, and through which."""
    owner: dict[int, list[tuple[Record, int]]] = {}  # node → records whose region holds it
    for rec, entry in graph.found:
        nodes = region(graph, rec, entry)
        if nodes is None:
            continue
        for k in nodes:
            owner.setdefault(k, []).append((rec, entry))
    uses: dict[int, list[tuple[Record, int, str]]] = {}
    uncovered: dict[int, list[int]] = {}
    for pos in sorted(candidates):
        acc = graph.param_node.get(pos)
        if acc is None:
            continue
        p = params[pos]
        seen: dict[int, tuple[Record, int, str]] = {}
        missing = []
        for consumer in graph.parents[acc]:
            holders = []
            for rec, entry in owner.get(consumer, ()):
                roles = [role for role, q in rec.params.items() if q is p]
                if len(roles) == 1:
                    holders.append((rec, entry, roles[0]))
            if len(holders) != 1:  # outside every region (or, never in practice, ambiguous)
                missing.append(consumer)
                continue
            rec, entry, role = holders[0]
            seen[id(rec)] = (rec, entry, role)
        if missing:
            uncovered[pos] = missing
        else:
            uses[pos] = sorted(seen.values(), key=lambda u: u[1])
    return Coverage(uses, uncovered)
