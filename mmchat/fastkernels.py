"""The TorchScript kernels of :class:`~mmchat.fastpath.FastDecoder`.

Plain functions over tensors and lists of weights, compiled once per process with
TorchScript (:func:`compiled`), or run eagerly where TorchScript is unavailable:

* :func:`step`: one token per row through the RNN, the fusion, combine and the head;
* :func:`prefill`: right-padded prompts through the RNN, a time step per iteration;
* :func:`greedy`: up to ``n`` greedy tokens of one reply in one call: each token's
  argmax, its probability and the state it was chosen in, stopping at the end of the
  reply. A Python call into TorchScript costs more than a small step's arithmetic,
  so a batch-1 greedy reply pays it once per ``n`` tokens instead of once per token.

The weights come in the order :class:`~mmchat.fastpath.FastDecoder` packs them:
``weights[i]`` / ``biases[i]`` (fp32, ``(K, N)``) or ``packed[i]`` (fp16, int8) is
matmul ``i``; ``precision`` indexes :data:`~mmchat.fastpath.PRECISIONS`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeAlias, cast

import torch

logger = logging.getLogger(__name__)

#: fbgemm's prepacked weights, as TorchScript names them (mypy cannot see torch.classes)
Packed: TypeAlias = torch.classes.quantized.LinearPackedParamsBase  # type: ignore[name-defined]


def linear(x: torch.Tensor, i: int, weights: list[torch.Tensor], biases: list[torch.Tensor],
           packed: list[Packed], precision: int
           ) -> torch.Tensor:
    """Matmul ``i`` of the step: x (B, K) -> (B, N)."""
    if precision == 2:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(x, packed[i], True)
        return y
    if precision == 1:
        y16: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x, packed[i])
        return y16
    return torch.addmm(biases[i], x, weights[i])


def rnn(x: torch.Tensor, state: torch.Tensor,
        weights: list[torch.Tensor], biases: list[torch.Tensor],
        packed: list[Packed], precision: int,
        lstm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row through the RNN layers, from its rows of the table, ``x``
    (B, G): layer 0's input projection. Returns the top layer's output (B, H) and the
    new state (S, L, B, H)."""
    H = state.shape[-1]
    n_layer = state.shape[1]
    new = torch.empty_like(state)  # (S, L, B, H), written in place layer by layer
    for k in range(n_layer):
        h = state[0, k]  # (B, H)
        if lstm:
            if k == 0 and precision == 0:  # the biases are in the table: one pass, not two
                gates = torch.addmm(x, h, weights[0])  # (B, 4H)
            elif k == 0:
                gates = linear(h, 0, weights, biases, packed, precision).add_(x)
            else:
                xh = torch.cat([x, h], dim=1)  # (B, 2H)
                gates = linear(xh, k, weights, biases, packed, precision)  # (B, 4H)
            ifo = torch.sigmoid_(gates[:, : 3 * H])  # input, forget, output gates
            c = torch.addcmul(ifo[:, H: 2 * H] * state[1, k], ifo[:, :H],
                              torch.tanh_(gates[:, 3 * H:]), out=new[1, k])
            x = torch.mul(ifo[:, 2 * H:], torch.tanh(c), out=new[0, k])  # (B, H)
        else:
            if k == 0:
                gi, gh = x, linear(h, 0, weights, biases, packed, precision)  # (B, 3H): r, z, n
            else:
                gi = linear(x, 2 * k - 1, weights, biases, packed, precision)  # (B, 3H)
                gh = linear(h, 2 * k, weights, biases, packed, precision)
            rz = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])  # reset, update gates
            n = torch.tanh(torch.addcmul(gi[:, 2 * H:], rz[:, :H], gh[:, 2 * H:]))
            x = torch.lerp(n, h, rz[:, H:], out=new[0, k])  # (1 - z) * n + z * h
    return x, new


def step(tokens: torch.Tensor, state: torch.Tensor, values: torch.Tensor | None,
         hidden: torch.Tensor | None, bias: torch.Tensor | None,
         const_weights: torch.Tensor | None, table: torch.Tensor, query: torch.Tensor,
         combine_ctx: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
         packed: list[Packed], precision: int,
         lstm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens (B,)`` from ``state (S, L, B, H)`` -> logits (B, V), weights (B, N), state.

    Attention (``values`` (B, N, d), ``hidden`` (B, N) True where a slot is padding)
    re-attends every step: the score scale is folded into ``query`` (H, d), and the
    context (B, d) goes through ``combine_ctx`` (d, H), combine's context half. In
    fp32 the query's columns are joined to combine's (``weights[combine]`` is
    ``(H, H + d)``), so one matmul gives both. Pooled
    fusions pass ``bias`` (B, H), combine's bias plus their constant context, and the
    turn's ``const_weights`` (B, N).
    """
    return fed(table.index_select(0, tokens), state, values, hidden, bias, const_weights,
               query, combine_ctx, weights, biases, packed, precision, lstm)


def fed(x0: torch.Tensor, state: torch.Tensor, values: torch.Tensor | None,
        hidden: torch.Tensor | None, bias: torch.Tensor | None,
        const_weights: torch.Tensor | None, query: torch.Tensor,
        combine_ctx: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
        packed: list[Packed], precision: int,
        lstm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`step` from the tokens' rows of the table, ``x0`` (B, G)."""
    n_layer = state.shape[1]
    x, new = rnn(x0, state, weights, biases, packed, precision, lstm)
    combine = n_layer if lstm else 2 * n_layer - 1
    H = x.shape[1]
    if values is not None and hidden is not None:  # attention
        if precision == 0:  # the query's columns follow combine's: one matmul for both
            yq = linear(x, combine, weights, biases, packed, precision)  # (B, H + d)
            y, q = yq[:, :H], yq[:, H:]
        else:
            y = linear(x, combine, weights, biases, packed, precision)  # (B, H)
            q = torch.mm(x, query)  # (B, d), scaled
        scores = torch.bmm(values, q.unsqueeze(2)).squeeze(2)  # (B, N)
        w = torch.softmax(scores.masked_fill_(hidden, -1e9), dim=1)  # (B, N); -1e9 = NEG_INF
        ctx = torch.bmm(w.unsqueeze(1), values).squeeze(1)  # (B, d)
        y = y.addmm_(ctx, combine_ctx)
    else:  # a context constant over the turn, already folded into a bias
        assert bias is not None and const_weights is not None
        w = const_weights
        y = linear(x, combine, weights, biases, packed, precision).add_(bias)  # (B, H)
    return linear(torch.tanh_(y), combine + 1, weights, biases, packed, precision), w, new


def prefill(tokens: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor,
            table: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
            packed: list[Packed], precision: int,
            lstm: bool) -> torch.Tensor:
    """Right-padded prompts (B, T) through the RNN, a time step per iteration for all
    rows; a row's state stops changing after its ``lengths`` tokens."""
    for t in range(tokens.shape[1]):
        _, new = rnn(table.index_select(0, tokens[:, t]), state, weights, biases, packed,
                     precision, lstm)
        done = lengths <= t  # (B,) rows whose prompt ended
        state = torch.where(done.view(1, 1, -1, 1), state, new) if bool(done.any()) else new
    return state


def greedy(logits: torch.Tensor, attention: torch.Tensor, state: torch.Tensor, n: int,
           eos: int, feed_last: bool, first: int, values: torch.Tensor | None,
           hidden: torch.Tensor | None, bias: torch.Tensor | None,
           const_weights: torch.Tensor | None, table: torch.Tensor, query: torch.Tensor,
           combine_ctx: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
           packed: list[Packed], precision: int,
           lstm: bool) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``n`` greedy tokens of one reply (batch 1) from ``logits`` (1, V), the
    ``attention`` (1, N) they came with and ``state`` (S, L, 1, H).

    Token ``i`` is the argmax of the logits it is chosen from; ``probs[i]`` is its
    softmax probability, ``chosen_with[i]`` those logits' attention row and
    ``states[i]`` the state they were computed in (the state before feeding token
    ``i``). With ``first >= 0`` that token is fed before anything is chosen (the logits
    passed in are then the ones ``first`` was chosen from). The loop stops after ``eos``;
    after the ``n``-th token it feeds that token only when ``feed_last``. Returns
    ``(tokens, probs (k,), chosen_with (k, N), states (k, S, L, 1, H), logits, attention,
    state)``, the last three after feeding the last token (when it was not fed: the
    ones it was chosen from).
    """
    if first >= 0:
        logits, attention, state = step(torch.full([1], first, dtype=torch.long), state, values,
                                        hidden, bias, const_weights, table, query, combine_ctx,
                                        weights, biases, packed, precision, lstm)
    tokens: list[int] = []
    # what each token was chosen from, kept by reference (every step makes new tensors)
    # and joined once a chunk: logits (1, V), attention (1, N), state (S, L, 1, H)
    rows: list[torch.Tensor] = []
    chosen_with: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    for i in range(n):
        t = int(torch.argmax(logits))  # logits is (1, V): its flat index is the token
        rows.append(logits)
        chosen_with.append(attention)
        states.append(state)
        tokens.append(t)
        if t == eos or (i == n - 1 and not feed_last):
            break
        logits, attention, state = fed(table[t: t + 1], state, values, hidden, bias,
                                       const_weights, query, combine_ctx, weights, biases,
                                       packed, precision, lstm)
    chosen_from = torch.cat(rows)  # (k, V)
    # the probabilities as generate.token_probs takes them: the same calls, once a chunk
    chosen = chosen_from.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1))
    probs = (chosen.squeeze(1) - torch.logsumexp(chosen_from, dim=-1)).exp()  # (k,)
    return (tokens, probs, torch.cat(chosen_with), torch.stack(states), logits, attention,
            state)


@functools.cache
def compiled(name: str) -> Callable[..., Any]:
    """The kernel ``name`` ("step", "prefill" or "greedy") compiled with TorchScript,
    which cuts the per-op cost of the small ops a token needs; the plain function where
    TorchScript is unavailable. Compiled once per process."""
    fn = cast(Callable[..., Any], {"step": step, "prefill": prefill, "greedy": greedy}[name])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
            return cast(Callable[..., Any], torch.jit.script(fn))
    except Exception as exc:  # TorchScript is deprecated; the eager code is the same
        logger.info("TorchScript unavailable (%s); decoding with eager %s", exc, name)
        return fn
