"""A fused per-token decode step for a trained :class:`~mmchat.model.DialogueLM`.

The reference step (:class:`~mmchat.runtime.ReferenceDecoder`) calls ``nn.LSTM``,
the fusion module and two ``nn.Linear`` per token. At batch 1 that is dominated by
overhead: module calls, oneDNN's RNN set-up, and ``torch.cat`` of weights it
could have joined once. :class:`FastDecoder` pulls the weights out once and runs
the same function as a short list of ATen calls:

* LSTM: one matmul per layer over ``[x; h]`` with the input and hidden weights
  joined and the gates reordered to ``i, f, o, g`` (one sigmoid, one tanh);
  GRU: two matmuls per layer, as the reset gate needs them apart.
* The new RNN state is written in place into one ``(S, L, B, H)`` tensor.
* ``attention`` re-attends every step with the score scale folded into the query
  projection; ``concat`` and ``weighted`` have a context that is constant over the
  turn, so its share of the ``combine`` layer is computed once per turn.

``precision="fp32"`` computes the reference function (logits equal to rounding);
``"int8"`` runs the RNN, combine and output matrices as dynamically quantized
int8 matmuls (fbgemm, per-channel weight scales): about 4x less weight traffic,
and greedy replies that may differ from the reference.

The decoder is a snapshot of the weights: build a new one after changing them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .fusion import NEG_INF, AttentionFusion, TurnMemory
from .model import DialogueLM
from .runtime import Decoder, ReferenceDecoder, pad_rows

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FastMemory:
    """A turn's memory as :meth:`FastDecoder.step` reads it (B rows)."""

    values: torch.Tensor | None = None  # (B, N, d) attention: the conditioned memory
    hidden: torch.Tensor | None = None  # (B, N) attention: True where a slot is not visible
    bias: torch.Tensor | None = None  # (B, H) pooled fusions: combine's bias plus the context
    weights: torch.Tensor | None = None  # (B, N) pooled fusions: the mass each vector gets

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FastMemory:
        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return FastMemory(apply(self.values), apply(self.hidden), apply(self.bias),
                          apply(self.weights))


class FastDecoder:
    """``step(tokens (B,), state (S, L, B, H), mem)`` -> logits (B, V), weights (B, N), state.

    Implements :class:`~mmchat.runtime.Decoder`. Build it from a model in eval mode
    whose RNN and linear layers are plain float32 modules (see :meth:`supports`).
    """

    def __init__(self, model: DialogueLM, precision: str = "fp32") -> None:
        problem = self.unsupported(model)
        if problem:
            raise ValueError(f"FastDecoder cannot run this model: {problem}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        c = model.config
        self.model = model
        self.precision = precision
        self.lstm = c.rnn == "lstm"
        self.attention = isinstance(model.fusion, AttentionFusion)
        H = c.n_hidden
        with torch.no_grad():
            self.embedding = model.tok_emb.weight.detach().clone()  # (V, E)
            rnn = model.rnn
            self.layers: list[tuple[Linear, ...]] = []
            for k in range(c.n_layer):
                w_ih, w_hh = getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}")
                b_ih, b_hh = getattr(rnn, f"bias_ih_l{k}"), getattr(rnn, f"bias_hh_l{k}")
                if self.lstm:
                    order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                                       torch.arange(2 * H, 3 * H)])  # i, f, g, o -> i, f, o, g
                    w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
                if self.lstm and precision == "fp32":
                    joined = torch.cat([w_ih, w_hh], dim=1)  # (4H, E + H) acts on [x; h]
                    self.layers.append((self._linear(joined, b_ih + b_hh),))
                else:
                    self.layers.append((self._linear(w_ih, b_ih), self._linear(w_hh, b_hh)))
            w_c, b_c = model.combine.weight.detach(), model.combine.bias.detach()  # (H, H + d)
            if self.attention:
                scale = model.fusion.scale
                self.query = self._linear(model.fusion.w.weight.detach() * scale, None, "fp32")
                self.combine = self._linear(w_c, b_c)
            else:
                self.combine_h = self._linear(w_c[:, :H], None)
                self.combine_ctx = w_c[:, H:].t().clone()  # (d, H)
                self.combine_bias = b_c.clone()
            self.head = self._linear(model.lm_head.weight.detach(), model.lm_head.bias.detach())

    @staticmethod
    def unsupported(model: DialogueLM) -> str:
        """Why this model cannot take the fast path, or ``""`` when it can."""
        if model.training:
            return "the model is in training mode (dropout); call model.eval()"
        rnn = model.rnn
        if type(rnn) not in (nn.LSTM, nn.GRU) or rnn.bidirectional or not rnn.bias:
            return f"its RNN is a {type(rnn).__name__}, not a plain nn.LSTM or nn.GRU"
        if getattr(rnn, "proj_size", 0):
            return "its LSTM has projections"
        linears = [model.combine, model.lm_head]
        if isinstance(model.fusion, AttentionFusion):
            linears.append(model.fusion.w)
        if any(type(m) is not nn.Linear for m in linears):
            return "its linear layers are quantized or replaced"
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return "its weights are not float32"
        return ""

    @classmethod
    def supports(cls, model: DialogueLM) -> bool:
        return not cls.unsupported(model)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None,
                precision: str | None = None) -> Linear:
        """``x (B, K) -> x @ weight.T + bias (B, N)`` at this decoder's precision."""
        if (precision or self.precision) == "int8":
            packed = pack_int8(weight, bias)
            return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
        w_t = weight.detach().t().contiguous()  # (K, N)
        if bias is None:
            return lambda x: torch.mm(x, w_t)
        b = bias.detach().clone()
        return lambda x: torch.addmm(b, x, w_t)

    # -- the Decoder protocol -------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, mem: TurnMemory, weights: torch.Tensor) -> FastMemory:
        """Per-turn constants from a batch-1 memory and the prompt step's weights (1, N)."""
        if self.attention:
            return FastMemory(values=mem.values.contiguous(), hidden=~mem.mask)
        h = mem.values.new_zeros(1, 1, self.model.config.n_hidden)  # unused by pooled fusions
        ctx, _ = self.model.context(h, mem)  # (1, 1, d), the same at every step
        bias = torch.addmm(self.combine_bias, ctx[:, 0], self.combine_ctx)  # (1, H)
        return FastMemory(bias=bias, weights=weights)

    def stack(self, mems: Sequence[FastMemory]) -> FastMemory:
        if len(mems) == 1:
            return mems[0]
        if self.attention:
            return FastMemory(values=pad_rows([m.values for m in mems]),
                              hidden=pad_rows([m.hidden for m in mems], True))
        return FastMemory(bias=torch.cat([m.bias for m in mems]),
                          weights=pad_rows([m.weights for m in mems]))

    def expand(self, mem: FastMemory, batch: int) -> FastMemory:
        return mem.map(lambda t: t if t.shape[0] == batch else t.expand(batch, *t.shape[1:]))

    def step(self, tokens: torch.Tensor, state: torch.Tensor, mem: FastMemory
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.embedding.index_select(0, tokens)  # (B, E)
        new = torch.empty_like(state)  # (S, L, B, H)
        H = state.shape[-1]
        for k, layer in enumerate(self.layers):
            h = state[0, k]  # (B, H)
            if self.lstm:
                if len(layer) == 1:
                    gates = layer[0](torch.cat([x, h], dim=1))  # (B, 4H)
                else:
                    gates = layer[0](x).add_(layer[1](h))
                i, f, o = torch.sigmoid(gates[:, : 3 * H]).chunk(3, dim=1)  # (B, H) each
                c = torch.addcmul(f * state[1, k], i, torch.tanh(gates[:, 3 * H:]),
                                  out=new[1, k])
                x = torch.mul(o, torch.tanh(c), out=new[0, k])  # (B, H)
            else:
                gi, gh = layer[0](x), layer[1](h)  # (B, 3H) each: r, z, n
                r, z = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H]).chunk(2, dim=1)
                n = torch.tanh(torch.addcmul(gi[:, 2 * H:], r, gh[:, 2 * H:]))  # (B, H)
                x = torch.lerp(n, h, z, out=new[0, k])  # (1 - z) * n + z * h
        if self.attention:
            q = self.query(x)  # (B, d), already scaled
            scores = torch.bmm(mem.values, q.unsqueeze(-1)).squeeze(-1)  # (B, N)
            weights = scores.masked_fill_(mem.hidden, NEG_INF).softmax(dim=-1)  # (B, N)
            ctx = torch.bmm(weights.unsqueeze(1), mem.values).squeeze(1)  # (B, d)
            y = torch.tanh(self.combine(torch.cat([x, ctx], dim=1)))  # (B, H)
        else:
            weights = mem.weights
            y = torch.tanh(self.combine_h(x).add_(mem.bias))  # (B, H)
        return self.head(y), weights, new  # (B, V), (B, N), (S, L, B, H)


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """fbgemm-prepacked int8 weight (symmetric, one scale per output row) for
    ``torch.ops.quantized.linear_dynamic``."""
    weight = weight.detach().float().contiguous()  # (N, K)
    scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127  # (N,)
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # Quantized tensors are deprecated as a user API, but they remain the only way
        # into fbgemm's packed int8 matmul; the tensor lives only until it is packed.
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
        q = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
    b = None if bias is None else bias.detach().float().contiguous()
    return torch.ops.quantized.linear_prepack(q, b)


def build_decoder(model: DialogueLM, fast: bool = True, precision: str = "fp32") -> Decoder:
    """The decoder to serve ``model`` with: fast when asked for and possible."""
    if not fast:
        return ReferenceDecoder(model)
    problem = FastDecoder.unsupported(model)
    if problem:
        logger.info("fast decoding is off: %s", problem)
        return ReferenceDecoder(model)
    return FastDecoder(model, precision)
