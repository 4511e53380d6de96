"""How the decoder sees the memory bank: conditioning plus three fusion methods.

The memory bank holds every attachment's vectors ``M`` (B, N, d) with a mask. Each
turn, a query ``q`` summarising the user's turn (text, and a glimpse at the memory,
which is how a spoken question is heard) conditions the memory with FiLM. This lets
the image regions answer *the question that was asked*. Then one of:

* ``concat``: max-pool each modality, concatenate the slots, project;
* ``weighted``: max-pool each modality, learned softmax weights over modalities;
* ``attention``: at every decoder step, the hidden state attends over all vectors.

Each returns a context per decoder step plus the mass each memory vector received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = -1e9


@dataclass
class TurnMemory:
    """The memory as seen during one turn, after conditioning on that turn's query."""

    values: torch.Tensor  # (B, N, d) conditioned memory vectors
    mask: torch.Tensor  # (B, N) bool, True where a vector is visible
    kinds: torch.Tensor  # (B, N) long, modality index (0 = the null slot)
    query: torch.Tensor  # (B, d) the turn query
    pooled: torch.Tensor | None = None  # (B, K, d) per-modality pools (concat/weighted)
    pooled_mask: torch.Tensor | None = None  # (B, K) bool


class TurnQuery(nn.Module):
    """q = tanh(W [h; bag; previous; glimpse]).

    ``h`` is the RNN state after the question, ``bag`` the mean embedding of the user
    turn's tokens (a direct view of the words, which the RNN takes long to learn to
    carry), and the glimpse is multi-head attention over the memory (how a spoken
    question reaches ``q``). ``h`` and ``bag`` are layer-normalised first: a mean of
    small token embeddings would otherwise barely move ``q``, and one changed word
    ("circle" for "square") must move it a lot. With ``carry``, the previous turn's
    query (``previous``, zeros on a first turn) moves both the glimpse's query and the
    output through two more matrices, so a follow-up ("and where is it?") can ask about
    what the last turn asked about. They start at zero (a new model computes what it
    would without them, and draws no extra random numbers).

    The glimpse is ``nn.MultiheadAttention`` (its weights, its function) computed for
    one query without projecting the memory: a head's key weights fold into its query
    and its value weights apply after the weighted sum (:meth:`glimpse`), so a turn
    costs O(N d) per head instead of O(N d^2) for the N memory vectors.
    """

    def __init__(self, n_hidden: int, n_embd: int, d_model: int, n_head: int = 4,
                 carry: bool = False) -> None:
        super().__init__()
        self.norm_h = nn.LayerNorm(n_hidden)
        self.norm_bag = nn.LayerNorm(n_embd)
        self.q_proj = nn.Linear(n_hidden + n_embd, d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.out = nn.Linear(n_hidden + n_embd + d_model, d_model)
        # previous query -> glimpse query, and -> output: (2d, d), zero at first
        self.carry = nn.Parameter(torch.zeros(2 * d_model, d_model)) if carry else None

    def forward(self, h: torch.Tensor, bag: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([self.norm_h(h), self.norm_bag(bag)], dim=-1)  # (B, H + E)
        query = self.q_proj(x)  # (B, d)
        carried = None
        if self.carry is not None and previous is not None:
            to_query, carried = F.linear(previous, self.carry).chunk(2, dim=-1)  # (B, d) each
            query = query + to_query
        glimpse = self.glimpse(query, memory, mask)  # (B, d)
        out = self.out(torch.cat([x, glimpse], dim=-1))  # (B, d)
        return torch.tanh(out if carried is None else out + carried)

    def glimpse(self, q: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """``self.attn(q, memory, memory, key_padding_mask=~mask)`` for one query per row:
        q (B, d), memory (B, N, d), mask (B, N) True where visible -> (B, d).

        Per head, q_h . (W_k m + b_k)_h = (W_kh^T q_h) . m + const, and the softmax
        ignores the constant; the weights sum to 1, so sum_n a_n (W_v m_n + b_v) =
        W_v (sum_n a_n m_n) + b_v. Every row needs a visible vector (the null slot)."""
        attn = self.attn
        B, d = q.shape
        H = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # (d, d) each
        b_q, _, b_v = attn.in_proj_bias.chunk(3)
        heads = F.linear(q, w_q, b_q).view(B, H, d // H)  # (B, H, dh)
        keys = torch.einsum("bhe,hed->bhd", heads, w_k.view(H, d // H, d))  # (B, H, d)
        scores = torch.einsum("bhd,bnd->bhn", keys, memory) * (d // H) ** -0.5
        weights = scores.masked_fill(~mask.unsqueeze(1), NEG_INF).softmax(dim=-1)
        mixed = torch.einsum("bhn,bnd->bhd", weights, memory)  # (B, H, d)
        values = torch.einsum("bhd,hed->bhe", mixed, w_v.view(H, d // H, d))  # (B, H, dh)
        return attn.out_proj(values.reshape(B, d) + b_v)  # (B, d)


class EntrySelector(nn.Module):
    """Which attachments a turn asks about: a gate per memory vector from the turn query.

    For each modality, ``q`` scores every recency (0 = the latest attachment) and every
    ordinal (0 = the first); a vector's gate is ``2 sigmoid(s_recency + s_ordinal)`` of
    the entry it came from, and its conditioned value is scaled by it. "the first
    picture" can thereby dim every other picture's vectors, for the decoder's attention
    and for the max-pooled summaries alike (so it works the same for every fusion
    method). The null slot keeps gate 1. The scores start at zero: gate 1 everywhere,
    so a warm-started model computes what it did.
    """

    def __init__(self, d_model: int, n_kinds: int, n_tags: int) -> None:
        super().__init__()
        self.n_kinds, self.n_tags = n_kinds, n_tags
        # built uninitialised and zeroed: no random numbers drawn (the model's other
        # weights stay what they are without it), and the model's init skips it
        self.score = nn.utils.skip_init(nn.Linear, d_model, 2 * n_kinds * n_tags)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.score.zero_init = True

    def forward(self, q: torch.Tensor, kinds: torch.Tensor, recency: torch.Tensor,
                ordinal: torch.Tensor) -> torch.Tensor:
        """q (B, d); kinds, recency, ordinal (B, N) -> gate (B, N), 1 on the null slot."""
        B = q.shape[0]
        s = self.score(q).view(B, 2, self.n_kinds, self.n_tags)  # (B, 2, K, n)
        kind = (kinds - 1).clamp_min(0)  # (B, N); the null slot is masked below
        by_recency = s[:, 0].flatten(1).gather(1, kind * self.n_tags + recency)  # (B, N)
        by_ordinal = s[:, 1].flatten(1).gather(1, kind * self.n_tags + ordinal)  # (B, N)
        gate = 2 * torch.sigmoid(by_recency + by_ordinal)  # (B, N)
        return torch.where(kinds > 0, gate, torch.ones_like(gate))


class FiLM(nn.Module):
    """Per-vector MLP whose hidden layer is scaled and shifted by the turn query."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_model, d_model)
        self.film = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, memory: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(q).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, d) each
        x = F.relu(self.inp(memory) * (1 + gamma) + beta)  # (B, N, d)
        return self.norm(memory + self.out(x))  # (B, N, d)


def pool_by_kind(values: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor,
                 n_kinds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool the visible vectors of each modality: (B, K, d) and a (B, K) presence mask."""
    pools, present = [], []
    for k in range(1, n_kinds + 1):
        sel = mask & (kinds == k)  # (B, N)
        if not bool(sel.any()):  # no row has this modality: skip the pass over the memory
            pools.append(values.new_zeros(values.shape[0], values.shape[-1]))
            present.append(sel[:, 0])
            continue
        filled = values.masked_fill(~sel.unsqueeze(-1), NEG_INF)
        pooled = filled.max(dim=1).values  # (B, d)
        has = sel.any(dim=1)  # (B,)
        pools.append(torch.where(has.unsqueeze(-1), pooled, torch.zeros_like(pooled)))
        present.append(has)
    return torch.stack(pools, dim=1), torch.stack(present, dim=1)


class AttentionFusion(nn.Module):
    """Luong 'general' attention: score(h, m) = (W h) . m, recomputed every step."""

    def __init__(self, n_hidden: int, d_model: int, n_kinds: int) -> None:
        super().__init__()
        self.w = nn.Linear(n_hidden, d_model, bias=False)
        self.scale = d_model ** -0.5

    def prepare(self, mem: TurnMemory) -> TurnMemory:
        return mem

    def forward(self, h: torch.Tensor, mem: TurnMemory) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.einsum("btd,bnd->btn", self.w(h), mem.values) * self.scale  # (B, T, N)
        scores = scores.masked_fill(~mem.mask.unsqueeze(1), NEG_INF)
        weights = scores.softmax(dim=-1)  # (B, T, N)
        ctx = torch.einsum("btn,bnd->btd", weights, mem.values)  # (B, T, d)
        return ctx, weights


class ConcatFusion(nn.Module):
    """Concatenate one pooled vector per modality slot and project; constant over the turn."""

    def __init__(self, n_hidden: int, d_model: int, n_kinds: int) -> None:
        super().__init__()
        self.n_kinds = n_kinds
        self.proj = nn.Linear(n_kinds * d_model + d_model, d_model)

    def prepare(self, mem: TurnMemory) -> TurnMemory:
        mem.pooled, mem.pooled_mask = pool_by_kind(mem.values, mem.mask, mem.kinds, self.n_kinds)
        return mem

    def forward(self, h: torch.Tensor, mem: TurnMemory) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = h.shape[:2]
        K, d = self.n_kinds, mem.pooled.shape[-1]
        flat = torch.cat([mem.pooled.flatten(1), mem.query], dim=-1)  # (B, K*d + d)
        ctx = self.proj(flat)  # (B, d)
        # each modality's share: how far its slot alone moves the projection
        base = self.proj(torch.zeros_like(flat[:1]))  # (1, d)
        slots = torch.zeros(K, B, flat.shape[1], dtype=flat.dtype, device=flat.device)
        for k in range(K):
            slots[k, :, k * d:(k + 1) * d] = flat[:, k * d:(k + 1) * d]
        contrib = (self.proj(slots) - base).norm(dim=-1).T  # (B, K)
        share = contrib / contrib.sum(dim=1, keepdim=True).clamp_min(1e-9)
        return ctx.unsqueeze(1).expand(B, T, -1), _spread(share, mem, T)


class WeightedFusion(nn.Module):
    """A learned softmax-weighted average of the per-modality pools, scored against q."""

    def __init__(self, n_hidden: int, d_model: int, n_kinds: int) -> None:
        super().__init__()
        self.n_kinds = n_kinds
        self.score = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.Tanh(),
                                   nn.Linear(d_model, 1))
        self.null = nn.Parameter(torch.zeros(d_model))

    def prepare(self, mem: TurnMemory) -> TurnMemory:
        mem.pooled, mem.pooled_mask = pool_by_kind(mem.values, mem.mask, mem.kinds, self.n_kinds)
        return mem

    def forward(self, h: torch.Tensor, mem: TurnMemory) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = h.shape[:2]
        pooled = torch.cat([self.null.expand(B, 1, -1), mem.pooled], dim=1)  # (B, 1+K, d)
        present = torch.cat([mem.pooled_mask.new_ones(B, 1), mem.pooled_mask], dim=1)
        q = mem.query.unsqueeze(1).expand_as(pooled)
        logits = self.score(torch.cat([pooled, q], dim=-1)).squeeze(-1)  # (B, 1+K)
        w = logits.masked_fill(~present, NEG_INF).softmax(dim=-1)  # (B, 1+K)
        ctx = (w.unsqueeze(-1) * pooled).sum(dim=1).unsqueeze(1).expand(B, T, -1)  # (B, T, d)
        return ctx, _spread(w[:, 1:], mem, T)


def _spread(share: torch.Tensor, mem: TurnMemory, T: int) -> torch.Tensor:
    """Turn per-modality shares (B, K) into per-vector weights (B, T, N) for reporting."""
    B, N = mem.mask.shape
    weights = mem.values.new_zeros(B, N)
    for k in range(share.shape[1]):
        sel = (mem.mask & (mem.kinds == k + 1)).float()  # (B, N)
        count = sel.sum(dim=1, keepdim=True).clamp_min(1)
        weights = weights + sel / count * share[:, k: k + 1]
    return weights.unsqueeze(1).expand(B, T, N)


FUSIONS = {"attention": AttentionFusion, "concat": ConcatFusion, "weighted": WeightedFusion}


def build_fusion(method: str, n_hidden: int, d_model: int, n_kinds: int) -> nn.Module:
    try:
        cls = FUSIONS[method]
    except KeyError:
        raise ValueError(
            f"unknown fusion method {method!r}; choose from {sorted(FUSIONS)}") from None
    return cls(n_hidden, d_model, n_kinds)
