"""HyboNet knowledge-graph scorer: a relation-specific LorentzLinear, scored by Lorentzian distance."""

from __future__ import annotations

import geoopt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.kg_ops import relation_matvec, tail_scores
from lightning_grendel.hyperbolic.manifold import LorentzManifold


class HyboNetKG(nn.Module):
    """``score(h, r, t) = margin + 2<f_r(e_h), e_t>_L + b_h + b_t`` (``= margin - 2k - d_L^2 + biases``).

    ``f_r(x) = bounded_time_point(W_r x + (0, c_r))`` with time in ``[1.1 sqrt(k), 1.1 sqrt(k) + max_scale]``
    (a fixed, not learned, scale as in HyboNet's KG setting): as in HyboNet's KG code, the time logit is
    that of ``W_r x`` and the relation bias ``c_r`` (``dim - 1`` values) shifts only the space part.
    Entities are points of ``dim`` coordinates (time included) whose space norm is clipped to
    ``max_norm`` whenever the optimiser re-projects them (``stabilize=1``, or every step with the
    projection retraction).
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int = 32, k: float = 1.0,
                 max_norm: float = 1.5, max_scale: float = 3.5, margin: float = 8.0,
                 retraction: str = "expmap") -> None:
        super().__init__()
        self.manifold = LorentzManifold(k, max_norm=max_norm, retraction=retraction)
        self.margin = margin
        self.max_scale = max_scale
        self.entity = geoopt.ManifoldParameter(self._init_entities(num_entities, dim), manifold=self.manifold)
        self.relation_transform = nn.Parameter(torch.empty(num_relations, dim, dim))
        nn.init.kaiming_uniform_(self.relation_transform)
        self.relation_bias = nn.Parameter(torch.zeros(num_relations, dim - 1))
        self.bias_head = nn.Parameter(torch.zeros(num_entities))
        self.bias_tail = nn.Parameter(torch.zeros(num_entities))

    def _init_entities(self, n: int, dim: int) -> Tensor:
        """Tangent directions of unit length at the origin: entities start at distance 1 from it."""
        u = torch.randn(n, dim)
        u[:, 0] = 0.0
        u = u / u.norm(dim=-1, keepdim=True)
        return self.manifold.projx(self.manifold.expmap0(u))

    def transform(self, head: Tensor, relation: Tensor) -> Tensor:
        """Relation-specific map of the head entities onto the hyperboloid, ``(B, dim)``."""
        # a sparse gradient for the B head rows: it is added in place to the dense one of the tail scores
        # instead of costing a second table-sized gradient and a table-sized sum
        z = relation_matvec(self.relation_transform, F.embedding(head, self.entity, sparse=True), relation)
        z = torch.cat([z[:, :1], z[:, 1:] + self.relation_bias.index_select(0, relation)], dim=-1)
        k = self.manifold.k.to(z)
        return lm.bounded_time_point(z, k, self.max_scale, 1.1 * torch.sqrt(k))

    def forward(self, head: Tensor, relation: Tensor, tails: Tensor) -> Tensor:
        """Scores of ``(B,)`` heads/relations against ``(B, n)`` candidate tails, ``(B, n)``."""
        h = self.transform(head, relation)
        scores = tail_scores(2.0 * h, self.entity, self.bias_tail, tails)
        return scores + (self.margin + self.bias_head.index_select(0, head)).unsqueeze(-1)

    def score_all(self, head: Tensor, relation: Tensor) -> Tensor:
        """Scores against every entity, ``(B, num_entities)``, for ranking: one matmul of ``(2 G h, 1)``
        with ``(e, b_t)`` (``G`` flips the time sign) and one addition, not a pass per term."""
        h = self.transform(head, relation)
        queries = torch.cat([-2.0 * h[:, :1], 2.0 * h[:, 1:], torch.ones_like(h[:, :1])], dim=-1)
        keys = torch.cat([self.entity, self.bias_tail.unsqueeze(-1)], dim=-1)
        return torch.addmm((self.margin + self.bias_head[head]).unsqueeze(-1), queries, keys.T)
