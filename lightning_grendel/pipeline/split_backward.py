"""A chunk's backward split into an input-gradient pass (``B``) and a weight-gradient pass (``W``).

``B`` walks the graph from the chunk's outputs to its inputs only. On the way it records the gradient
reaching every *weight entry*: a node on that path with a branch that leads to parameters and not to
the inputs (a Linear's matmul node: its branches are the layer input and the weight). ``W`` starts
from the entries with the recorded gradients and runs only their weight branches, so B + W cost about
one fused backward instead of B plus a second walk of the whole graph from the outputs.

``W`` runs one autograd call per group of entries that share parameters (usually one entry per
group: a call from an entry needs nothing on the input path, since its parameters are reached
through its weight branches only). Where a group has several entries and one lies on the input path
above another (a weight used twice), the lower entry's hook replaces what reaches it during ``W`` with
its recorded gradient, so nothing is counted twice. A chunk without differentiable inputs (the first)
has no ``B`` to share: its ``W`` is the whole backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node


def _node(tensor: torch.Tensor) -> Node | None:
    """The autograd node a tensor's gradient enters (a leaf's accumulator, made on demand)."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    if not tensor.requires_grad:
        return None
    return tensor.view_as(tensor).grad_fn.next_functions[0][0]


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _post_order(roots: Iterable[Node]) -> list[Node]:
    """Every node reachable from ``roots``, each after all the nodes below it (iterative: graphs are deep)."""
    order: list[Node] = []
    seen: set[Node] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(_children(root)))]
        while stack:
            node, children = stack[-1]
            child = next((c for c in children if c not in seen), None)
            if child is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(child)
                stack.append((child, iter(_children(child))))
    return order


def _reaching(order: Sequence[Node], targets: set[Node]) -> set[Node]:
    """The nodes of a post-order from which some target is reachable (targets included)."""
    reaching: set[Node] = set()
    for node in order:
        if node in targets or any(c in reaching for c in _children(node)):
            reaching.add(node)
    return reaching


@dataclass
class _Group:
    """Entries that share parameters: where ``W`` starts, with which gradients, and which parameters it fills."""

    edges: list[GradientEdge | torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)
    params: dict[object, torch.Tensor] = field(default_factory=dict)  # by parameter node (or id)
    clamps: dict[Node, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)


@dataclass
class WeightPass:
    """What ``W`` needs after ``B``: one autograd call per group of entries."""

    groups: list[_Group] = field(default_factory=list)

    def run(self) -> None:
        """Accumulate the parameters' gradients (into ``.grad``) and free the graph."""
        groups, self.groups = self.groups, []
        for group in groups:
            if not group.params or not group.edges:
                continue
            clamps = group.clamps if len(group.clamps) > 1 else {}
            handles = [node.register_prehook(lambda _, saved=saved: saved) for node, saved in clamps.items()]
            try:
                torch.autograd.backward(group.edges, group.grads, inputs=list(group.params.values()))
            finally:
                for handle in handles:
                    handle.remove()


def whole_backward(outputs: list[torch.Tensor], grads: list[torch.Tensor | None],
                   params: Sequence[torch.Tensor]) -> WeightPass:
    """A ``W`` that is the whole backward (a chunk with no input gradient to compute)."""
    used = [p for p in params if p.requires_grad]
    return WeightPass([_Group(list(outputs), list(grads), {id(p): p for p in used})]) if outputs else WeightPass()


def input_gradient(inputs: list[torch.Tensor], outputs: list[torch.Tensor], grads: list[torch.Tensor | None],
                   params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], WeightPass]:
    """``B``: the gradients of the chunk inputs, and the :class:`WeightPass` that finishes the backward."""
    if not outputs:
        return [torch.zeros_like(x) for x in inputs], WeightPass()
    if not inputs:
        return [], whole_backward(outputs, grads, params)
    param_of = {node: p for p in params if (node := _node(p)) is not None}
    roots = [node for node in map(_node, outputs) if node is not None]
    order = _post_order(roots)
    to_inputs = _reaching(order, {node for node in map(_node, inputs) if node is not None})
    to_params = _reaching(order, set(param_of))
    branches = {node: [c for c in _children(node) if c in to_params and c not in to_inputs]
                for node in order if node in to_inputs}
    entries = [node for node, below in branches.items() if below]
    recorded: dict[Node, tuple[torch.Tensor | None, ...]] = {}
    handles = [n.register_prehook(lambda grad_outputs, n=n: recorded.__setitem__(n, grad_outputs)) for n in entries]
    try:
        results = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    starts: list[tuple[GradientEdge | torch.Tensor, torch.Tensor | None, list[Node], Node | None]] = []
    for y, g in zip(outputs, grads, strict=True):  # an output no input reaches: its weights start there
        node = _node(y)
        if node is not None and node not in to_inputs and node in to_params:
            starts.append((y, g, [node], None))
    for node in entries:
        for index, grad in enumerate(recorded.get(node, ())):
            if grad is not None:
                starts.append((GradientEdge(node, index), grad, branches[node], node))
    weight = WeightPass(_groups(starts, param_of, recorded))
    return [torch.zeros_like(x) if r is None else r for x, r in zip(inputs, results, strict=True)], weight


def _groups(starts: list[tuple[GradientEdge | torch.Tensor, torch.Tensor | None, list[Node], Node | None]],
            param_of: dict[Node, torch.Tensor],
            recorded: dict[Node, tuple[torch.Tensor | None, ...]]) -> list[_Group]:
    """Join the starts whose weight branches reach a common parameter (union by parameter)."""
    owner: dict[Node, int] = {}  # parameter node -> index of its group in ``merged``
    merged: list[_Group | None] = []
    for edge, grad, below, entry in starts:
        group = _Group([edge], [grad], {n: param_of[n] for n in _post_order(below) if n in param_of})
        if entry is not None:
            group.clamps[entry] = recorded[entry]
        for index in sorted({owner[n] for n in group.params if n in owner}):
            other = merged[index]
            merged[index] = None
            group.edges += other.edges
            group.grads += other.grads
            group.params.update(other.params)
            group.clamps.update(other.clamps)
        for n in group.params:
            owner[n] = len(merged)
        merged.append(group)
    return [group for group in merged if group is not None]
