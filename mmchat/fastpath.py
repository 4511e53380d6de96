"""A fused per-token decode step for a trained :class:`~mmchat.model.DialogueLM`.

The reference step (:class:`~mmchat.runtime.ReferenceDecoder`) calls ``nn.LSTM``,
the fusion module and two ``nn.Linear`` per token. At batch 1 that is dominated by
overhead: module calls and oneDNN's per-call RNN set-up. :class:`FastDecoder` pulls
the weights out once and runs the same function as a short list of ATen calls:

* The first layer's input projection is looked up, not multiplied: the embedding
  table times the layer's input weights (plus its biases) is computed once, ``(V, G)``
  for ``G`` gate rows, so a token costs one row read. It is exact, and in int8 it
  keeps the embedding out of the quantized matmuls.
* LSTM: one matmul per later layer over ``[x; h]`` with the input and hidden weights
  joined and the gates reordered to ``i, f, o, g`` (one sigmoid, one tanh);
  GRU: two matmuls per layer, as the reset gate needs them apart.
* The new RNN state is written in place into one ``(S, L, B, H)`` tensor.
* ``attention`` re-attends every step with the score scale folded into the query
  projection, and ``combine``'s context half is applied to the context (B, d) in
  float32. ``concat`` and ``weighted`` have a context that is constant over the turn,
  so its share of the ``combine`` layer is computed once per turn.

``precision="fp32"`` computes the reference function (logits equal to rounding).
``"fp16"`` stores the RNN, combine and output matrices in half precision (fbgemm
converts them on the fly; 2x less weight traffic); ``"int8"`` runs them as
dynamically quantized int8 matmuls (fbgemm, per-channel weight scales; 4x less).
Both give logits close to the reference, and greedy replies that may differ. A
model loaded with ``model.quantize = "dynamic-int8"`` is served in int8
(:func:`build_decoder`).

The step itself is one TorchScript function (:mod:`mmchat.fastkernels`): its ~30 small
ops cost less there, which makes the fp16 and int8 steps 1.3x to 2x faster at batch 1.
A greedy reply can also take several tokens per call (:meth:`FastDecoder.greedy`):
at the bundled model's size a call into TorchScript costs about what a step's
arithmetic does. Without TorchScript the same functions run eagerly.

The decoder is a snapshot of the weights: build a new one after changing them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .fastkernels import compiled
from .fusion import AttentionFusion, TurnMemory
from .generate import GreedyRun
from .model import DialogueLM
from .runtime import Decoder, ReferenceDecoder, pad_rows

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


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
    whose RNN and linear layers are plain float32 modules or their dynamically quantized
    versions (see :meth:`supports`); quantized weights are read back as float32 and packed
    again at ``precision``.
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
        rnn = float_params(model.rnn)
        # Every matmul of the step, in the order _step indexes them: the RNN layers
        # (LSTM: layer 0 on h, later layers on [x; h]; GRU: layer 0 hidden, later layers
        # input then hidden), combine, the head.
        linears: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            embedding = model.tok_emb.weight.detach()  # (V, E)
            order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                               torch.arange(2 * H, 3 * H)])  # LSTM gates i, f, g, o -> i, f, o, g
            for k in range(c.n_layer):
                w_ih, w_hh = rnn[f"weight_ih_l{k}"], rnn[f"weight_hh_l{k}"]
                b_ih, b_hh = rnn[f"bias_ih_l{k}"], rnn[f"bias_hh_l{k}"]
                if self.lstm and k == 0:
                    self.table = torch.addmm((b_ih + b_hh)[order], embedding,
                                             w_ih[order].t())  # (V, 4H)
                    linears.append((w_hh[order], torch.zeros(4 * H)))
                elif self.lstm:
                    joined = torch.cat([w_ih, w_hh], dim=1)[order]  # (4H, 2H) acts on [x; h]
                    linears.append((joined, (b_ih + b_hh)[order]))
                elif k == 0:
                    self.table = torch.addmm(b_ih, embedding, w_ih.t())  # (V, 3H): r, z, n
                    linears.append((w_hh, b_hh))
                else:
                    linears += [(w_ih, b_ih), (w_hh, b_hh)]  # (3H, H) each: r, z, n
            combine, head = float_params(model.combine), float_params(model.lm_head)
            w_c, b_c = combine["weight"], combine["bias"]  # (H, H + d), (H,)
            if self.attention:
                linears.append((w_c[:, :H], b_c))  # the context half is applied per turn
                self.combine_ctx = w_c[:, H:].t().contiguous()  # (d, H)
                # the score scale is folded into the query projection: (H, d)
                w_q = float_params(model.fusion.w)["weight"]
                self.query = (w_q * model.fusion.scale).t().contiguous()
            else:
                linears.append((w_c[:, :H], torch.zeros_like(b_c)))  # context added per turn
                self.query = torch.empty(0)
                self.combine_ctx = w_c[:, H:].t().clone()  # (d, H)
                self.combine_bias = b_c.clone()
            linears.append((head["weight"], head["bias"]))
            if self.attention and precision == "fp32":  # one matmul for combine and query
                w, b = linears[-2]
                linears[-2] = (torch.cat([w, self.query.t()]),
                               torch.cat([b, b.new_zeros(self.query.shape[1])]))
            if precision == "int8":
                self.weights, self.biases = [], []
                self.packed = [pack_int8(w, b) for w, b in linears]
            elif precision == "fp16":
                self.weights, self.biases = [], []
                self.packed = [torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), b)
                               for w, b in linears]
            else:
                self.weights = [w.t().contiguous() for w, _ in linears]  # (K, N) each
                self.biases = [b.clone() for _, b in linears]
                self.packed = []
        self._step = compiled("step")
        self._prefill = compiled("prefill")
        self._greedy = compiled("greedy")

    @staticmethod
    def unsupported(model: DialogueLM) -> str:
        """Why this model cannot take the fast path, or ``""`` when it can."""
        if model.training:
            return "the model is in training mode (dropout); call model.eval()"
        rnn = model.rnn
        if kind(rnn) == "other" or rnn.bidirectional or not rnn.bias:
            return f"its RNN is a {type(rnn).__name__}, not a plain nn.LSTM or nn.GRU"
        if getattr(rnn, "proj_size", 0):
            return "its LSTM has projections"
        if model.reread is not None:
            return "it reads the memory twice a step ([fusion] reread)"
        linears = [model.combine, model.lm_head]
        if isinstance(model.fusion, AttentionFusion):
            linears.append(model.fusion.w)
        if any(kind(m) == "other" for m in linears):
            return "its linear layers are replaced by modules it does not know"
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return "its weights are not float32"
        return ""

    @classmethod
    def supports(cls, model: DialogueLM) -> bool:
        return not cls.unsupported(model)

    # -- the Decoder protocol -------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, mem: TurnMemory, weights: torch.Tensor) -> FastMemory:
        """Per-turn constants from a batch-1 memory and the prompt step's weights (1, N)."""
        if self.attention:
            values = mem.values.contiguous()  # (1, N, d)
            return FastMemory(values=values, hidden=~mem.mask)
        h = mem.values.new_zeros(1, 1, self.model.config.n_hidden)  # unused by pooled fusions
        _, ctx, _ = self.model.read(h, mem)  # (1, 1, d), the same at every step
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
        rows = (mem.values if mem.values is not None else mem.bias).shape[0]
        if rows == batch:
            return mem
        return mem.map(lambda t: t.expand(batch, *t.shape[1:]))

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor
                ) -> torch.Tensor:
        """Right-padded prompts ``tokens (B, T)`` of ``lengths (B,)`` through the RNN
        from ``state (S, L, B, H)``: the state after each row's last token. The
        same weights and precision as :meth:`step`, so a prompt costs what feeding its
        tokens one by one would, in one call per time step for the whole batch."""
        return self._prefill(tokens, lengths, state, self.table, self.weights, self.biases,
                             self.packed, PRECISIONS.index(self.precision), self.lstm)

    def step(self, tokens: torch.Tensor, state: torch.Tensor, mem: FastMemory
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._step(tokens, state, mem.values, mem.hidden, mem.bias, mem.weights,
                          self.table, self.query, self.combine_ctx, self.weights, self.biases,
                          self.packed, PRECISIONS.index(self.precision), self.lstm)

    def greedy(self, logits: torch.Tensor, attention: torch.Tensor, state: torch.Tensor,
               mem: FastMemory, n: int, eos: int, feed_last: bool, first: int = -1
               ) -> GreedyRun:
        """Up to ``n`` greedy tokens of one reply (batch 1) in one call: the argmax of
        ``logits`` (1, V), fed through :meth:`step`, and so on, stopping after ``eos``;
        ``first`` (when >= 0) is fed before the first choice (see
        :func:`mmchat.fastkernels.greedy`). The tokens are the ones :meth:`step` and an
        argmax per token would choose, and their probabilities the same."""
        return GreedyRun(*self._greedy(
            logits, attention, state, n, eos, feed_last, first, mem.values, mem.hidden,
            mem.bias, mem.weights, self.table, self.query, self.combine_ctx, self.weights,
            self.biases, self.packed, PRECISIONS.index(self.precision), self.lstm))


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


def kind(module: nn.Module) -> str:
    """"float" for plain nn.Linear/LSTM/GRU, "int8" for their dynamically quantized
    versions (``model.quantize = "dynamic-int8"``), else "other"."""
    if type(module) in (nn.Linear, nn.LSTM, nn.GRU):
        return "float"
    if callable(getattr(module, "get_weight", None)) and callable(getattr(module, "get_bias",
                                                                          None)):
        return "int8"  # torch.ao.nn.quantized.dynamic.LSTM / GRU
    if callable(getattr(module, "weight", None)) and callable(getattr(module, "bias", None)):
        return "int8"  # torch.ao.nn.quantized.dynamic.Linear
    return "other"


def float_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """A linear or RNN module's weights and biases by name, as float32 (dequantized
    from a dynamically quantized module)."""
    if kind(module) == "float":
        return {name: p.detach() for name, p in module.named_parameters()}
    if hasattr(module, "get_weight"):
        weights = {name: w.dequantize() for name, w in module.get_weight().items()}
        return {**weights, **{name: b.detach() for name, b in module.get_bias().items()}}
    bias = module.bias()
    weight = {"weight": module.weight().dequantize()}
    return weight if bias is None else {**weight, "bias": bias.detach()}


def build_decoder(model: DialogueLM, fast: bool = True) -> Decoder:
    """The decoder to serve ``model`` with: fast when asked for and possible, in int8 when
    the model was quantized (``model.quantize = "dynamic-int8"``)."""
    if not fast:
        return ReferenceDecoder(model)
    problem = FastDecoder.unsupported(model)
    if problem:
        logger.info("fast decoding is off: %s", problem)
        return ReferenceDecoder(model)
    return FastDecoder(model, "int8" if kind(model.lm_head) == "int8" else "fp32")
