"""Decode every active reply together: one batched model step per token.

The engine owns one :class:`DecodeScheduler`. A turn's prefill runs through
:meth:`DecodeScheduler.call`; its reply then joins with :meth:`DecodeScheduler.feed`
(each step's tokens go to a callback on the event loop, one wake-up for all replies)
or :meth:`DecodeScheduler.decode` (an async stream of tokens). On the model thread a
single worker loops:

1. run queued jobs (prefills of new turns, the stored form of finished ones) between
   two steps; the jobs of one kind queued meanwhile run as one batch
   (:meth:`DecodeScheduler.call_batched`);
2. let new replies join, drop finished and cancelled ones;
3. feed the last token of every ready reply in ONE ``decoder.step``: RNN states
   stacked along the batch, memories padded to the longest with the padding masked;
4. hand each reply its row of logits; each samples its own next token with its own
   settings and random generator (:class:`~mmchat.generate.Sampler`).

A plain greedy reply decoding alone, on a decoder that has ``greedy``
(:class:`~mmchat.fastpath.FastDecoder`), takes the tokens it may still have waiting
(up to :data:`AHEAD`) from one ``decoder.greedy`` call instead of a step call each:
at batch 1 the call costs about what a small model's step does.

A reply is *ready* while fewer than :data:`AHEAD` of its tokens wait unread, so
decoding runs just ahead of the event loop and a stalled consumer costs nothing.
Cancellation is checked before every step. Beam search keeps its own batch (its
beams) and runs by itself between steps. The engine chooses a sampled reply's first
token in its prefill job (:func:`first_token`), so it streams before the next step.

While replies are decoding the worker holds the model thread, so other model work
must go through :meth:`DecodeScheduler.call` to run between steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from .errors import Cancelled
from .generate import Sampler, Token, token_probs
from .runtime import Decoder, TurnRun

logger = logging.getLogger(__name__)

#: Tokens a reply may have waiting unread before it sits out a step.
AHEAD = 4

_END = object()  # end of a reply's token stream


@dataclass(eq=False)
class _Reply:
    """A reply registered with the scheduler. Counters are guarded by the scheduler's lock."""

    run: TurnRun
    loop: asyncio.AbstractEventLoop
    #: On the event loop: each token, then ``None`` at the end, or the exception that
    #: ended the reply.
    sink: Callable[[Any], None]
    cancelled: Callable[[], bool]
    #: Whether a token counts as read once the sink has it (else see ``_taken``).
    reads: bool = True
    unread: int = 0  # tokens delivered that the consumer has not taken yet
    stopped: bool = False  # the consumer went away
    started: bool = False
    done: bool = False

    @property
    def sampler(self) -> Sampler | None:
        return self.run.generation.sampler

    def wants_out(self) -> bool:
        return self.stopped or self.cancelled()


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    batched: bool = False  # fn takes a list of items (args[0] each) and returns a list


@dataclass
class _Batch:
    """The batch of the previous step, reused while its members stay the same."""

    members: tuple[_Reply, ...] = ()  # compared by identity
    memory: Any = None
    state: torch.Tensor | None = None  # (S, L, B, H) after the step


class TokenStream:
    """Async iterator over one reply's tokens; ``async with`` it so leaving early
    takes the reply out of the batch."""

    def __init__(self, scheduler: DecodeScheduler, run: TurnRun,
                 cancelled: Callable[[], bool]) -> None:
        self._scheduler = scheduler
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reply = scheduler._join(run, self._queue.put_nowait, cancelled, reads=False)
        self._ended = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Token:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self._scheduler._taken(self._reply)
        return item

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop decoding this reply (if it is still going) before the next step."""
        self._scheduler._stop(self._reply)


class DecodeScheduler:
    """Runs model work on ``executor`` (one thread) and decodes replies in batches.

    Without a decoder it only runs jobs (:meth:`call`, :meth:`call_batched`): the
    engine's encoders have one of those on a thread of their own.
    """

    def __init__(self, decoder: Decoder | None, executor: Executor) -> None:
        self.decoder = decoder
        self._executor = executor
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._joining: list[_Reply] = []
        self._replies: list[_Reply] = []  # owned by the worker
        self._working = False
        self._closed = False
        self._batch = _Batch()

    # -- event-loop side -------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread, between two decode steps."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, loop, loop.create_future())
        with self._cond:
            self._check_open()
            self._jobs.append(job)
            self._wake()
        return await job.future

    async def call_batched(self, fn: Callable[[list[Any]], list[Any]], item: Any) -> Any:
        """Run ``fn([item, ...])`` on the model thread, between two decode steps, with every
        item queued for the same ``fn`` since the last step; return ``item``'s result.

        ``fn`` returns one result per item, in order; a result that is an exception is
        raised for its item alone. If ``fn`` raises, every item of the batch fails.
        """
        loop = asyncio.get_running_loop()
        job = _Job(fn, (item,), loop, loop.create_future(), batched=True)
        with self._cond:
            self._check_open()
            self._jobs.append(job)
            self._wake()
        return await job.future

    def decode(self, run: TurnRun, cancelled: Callable[[], bool] = lambda: False
               ) -> TokenStream:
        """Join ``run`` to the batch; tokens arrive on the returned stream.

        ``cancelled`` is polled from the model thread before every step.
        """
        return TokenStream(self, run, cancelled)

    def feed(self, run: TurnRun, sink: Callable[[Any], None],
             cancelled: Callable[[], bool] = lambda: False, *, started: bool = False
             ) -> Callable[[], None]:
        """Join ``run`` to the batch and hand its tokens to ``sink`` on the event loop:
        each :class:`~mmchat.generate.Token`, then ``None`` at the end, or the exception
        that ended it. A step's tokens reach every sink of a loop in one callback, with
        no task switch per token. ``started``: the first token was already taken with
        :func:`first_token` (and the reply goes on). Returns a function that takes the
        reply out of the batch before the next step (if it still runs).
        """
        reply = self._join(run, sink, cancelled, started=started)
        return lambda: self._stop(reply)

    def _join(self, run: TurnRun, sink: Callable[[Any], None], cancelled: Callable[[], bool],
              *, reads: bool = True, started: bool = False) -> _Reply:
        if self.decoder is None:
            raise TypeError("this scheduler runs jobs only; it has no decoder")
        reply = _Reply(run, asyncio.get_running_loop(), sink, cancelled, reads,
                       started=started)
        with self._cond:
            self._check_open()
            self._joining.append(reply)
            self._wake()
        return reply

    def close(self) -> None:
        """Stop taking work: queued jobs fail with :class:`~mmchat.errors.Cancelled`, and
        every reply ends before the next step (its stream just stops). The worker then
        exits, so the executor can shut down without waiting on a decode. Never blocks."""
        with self._cond:
            self._closed = True
            for reply in self._replies + self._joining:
                reply.stopped = True
            jobs, self._jobs = list(self._jobs), deque()
            self._cond.notify()
        for job in jobs:
            _post(job.loop, _settle, job.future, None, Cancelled("the engine is closing"))

    def _check_open(self) -> None:
        if self._closed:
            raise Cancelled("the engine is closing")

    def _taken(self, reply: _Reply) -> None:
        with self._cond:
            reply.unread -= 1
            if reply.unread == AHEAD - 1:
                self._cond.notify()

    def _hand_over(self, items: list[tuple[_Reply, Any]]) -> None:
        """On the event loop: give each reply's sink what one step made for it."""
        read: dict[_Reply, int] = {}
        for reply, item in items:
            if item is _END:
                item = None
            elif reply.reads and not isinstance(item, BaseException):
                read[reply] = read.get(reply, 0) + 1
            try:
                reply.sink(item)
            except Exception:  # one consumer's bug must not starve the others
                logger.exception("a reply's token sink failed")
        if read:
            with self._cond:
                for reply, n in read.items():
                    reply.unread -= n
                self._cond.notify()

    def _stop(self, reply: _Reply) -> None:
        with self._cond:
            if not reply.done:
                reply.stopped = True
                self._cond.notify()

    def _wake(self) -> None:
        """Start the worker, or wake it. Call with the lock held."""
        if self._working:
            self._cond.notify()
        else:
            self._working = True
            self._executor.submit(self._work)

    # -- model thread ----------------------------------------------------------------

    def _work(self) -> None:
        try:
            while (todo := self._next()) is not None:
                jobs, ready = todo
                for group in _group(jobs):
                    self._run_jobs(group)
                if ready:
                    self._advance(ready)
        except BaseException as exc:  # never leave a consumer waiting forever
            logger.exception("decode scheduler failed")
            with self._cond:
                failed, self._replies, self._joining = self._replies + self._joining, [], []
                jobs, self._jobs = list(self._jobs), deque()
                self._working = False
            for job in jobs:
                _post(job.loop, _settle, job.future, None, exc)
            self._deliver([(r, exc) for r in failed])
            raise

    def _next(self) -> tuple[list[_Job], list[_Reply]] | None:
        """Wait for jobs or ready replies; ``None`` (worker exits) when there is nothing."""
        with self._cond:
            while True:
                self._replies.extend(self._joining)
                self._joining.clear()
                jobs = list(self._jobs)
                self._jobs.clear()
                ready = [r for r in self._replies if r.unread < AHEAD or r.wants_out()]
                if jobs or ready:
                    return jobs, ready
                if not self._replies:
                    self._working = False
                    self._batch = _Batch()
                    return None
                # A consumer taking a token notifies; the timeout catches cancellation
                # of a reply that sits out waiting for its consumer.
                self._cond.wait(timeout=0.05)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Run one plain job, or a group of batched jobs with the same ``fn`` in one call."""
        first = jobs[0]
        try:
            if first.batched:
                results = first.fn([job.args[0] for job in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"{first.fn!r} returned {len(results)} results "
                                       f"for {len(jobs)} items")
                outcomes = [(None, r) if isinstance(r, Exception) else (r, None)
                            for r in results]
            else:
                outcomes = [(first.fn(*first.args), None)]
        except Exception as exc:
            outcomes = [(None, exc)] * len(jobs)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any, Any]]] = {}
        for job, (result, exc) in zip(jobs, outcomes):
            by_loop.setdefault(job.loop, []).append((job.future, result, exc))
        for loop, settled in by_loop.items():  # one wake-up per event loop, not per job
            _post(loop, _settle_all, settled)

    def _advance(self, ready: list[_Reply]) -> None:
        """One token for every ready reply: a batched step for the sampled ones.

        A failure ends only the replies it touches; the worker carries on.
        """
        out: list[tuple[_Reply, Any]] = []
        batch: list[_Reply] = []
        with torch.inference_mode():
            for reply in ready:
                if reply.wants_out():
                    out.append((reply, _END))
                elif reply.sampler is None:  # beam search: its own batch, its own steps
                    reply.started = True
                    self._guarded(reply, out, lambda r=reply: self._emit(
                        r, r.run.next_token(), out, record=False))
                elif not reply.started:  # the first token comes from the prompt's logits
                    reply.started = True
                    self._guarded(reply, out, lambda r=reply: self._emit(
                        r, first_token(r.run), out, record=False))
                else:
                    batch.append(reply)
            if len(batch) == 1 and len(self._replies) == 1 and self._runs_alone(batch[0]):
                self._guarded(batch[0], out, lambda r=batch[0]: self._greedy(r, out))
            elif batch:
                try:
                    logits, weights, state = self._step(batch)
                except Exception as exc:
                    logger.exception("batched decode step failed")
                    self._batch = _Batch()
                    out += [(r, exc) for r in batch]
                else:
                    # plain greedy rows take their argmax and its probability from one
                    # call each for the whole batch
                    picked = probs = None
                    if any(r.sampler.batchable for r in batch):
                        picked = logits.argmax(dim=-1).tolist()
                        probs = token_probs(logits, picked)
                    # each reply's rows as views, cut in one call per tensor
                    logit_rows, weight_rows = logits.split(1), weights.split(1)
                    state_rows = state.split(1, dim=2)
                    width = weights.shape[1]
                    for b, reply in enumerate(batch):
                        n = reply.run.memory_size
                        w = weight_rows[b] if n == width else weight_rows[b][:, :n]
                        rows = logit_rows[b], w, state_rows[b]  # (1, V), (1, n), (S, L, 1, H)
                        batched = picked is not None and reply.sampler.batchable
                        token, prob = (picked[b], probs[b]) if batched else (None, None)
                        self._guarded(reply, out, lambda r=reply, rows=rows, t=token, p=prob:
                                      self._choose(r, rows, out, t, p))
        self._deliver(out)

    def _runs_alone(self, reply: _Reply) -> bool:
        """Whether ``reply`` can take several tokens from one ``decoder.greedy`` call."""
        return reply.sampler.batchable and hasattr(self.decoder, "greedy")

    def _greedy(self, reply: _Reply, out: list[tuple[_Reply, Any]]) -> None:
        """Feed a lone greedy reply's last token and choose the next ones, as many as it
        may have waiting, in one ``decoder.greedy`` call; they are the tokens that
        steps of one row would give."""
        sampler = reply.sampler
        n = min(AHEAD - reply.unread, sampler.params.max_new_tokens - len(sampler.out))
        run = self.decoder.greedy(sampler.logits, sampler.weights, sampler.state,
                                  reply.run.step_memory, max(n, 1), sampler.eos_id, False,
                                  sampler.last)
        self._batch = _Batch()  # the state moved on outside the batch
        for token, prob, weights, state in zip(run.tokens, run.probs.tolist(),
                                               run.chosen_with, run.states):
            chosen = sampler.take(token, prob, weights, state)
            self._emit(reply, chosen, out)
            if chosen is None or sampler.done:
                return
        # the last token was chosen but not fed, as after a step and Sampler.choose
        sampler.logits, sampler.weights, sampler.state = run.logits, run.attention, run.state

    def _step(self, batch: list[_Reply]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed every reply's last token in one decoder step."""
        members = tuple(batch)
        samplers = [r.sampler for r in batch]
        if members == self._batch.members:
            memory, state = self._batch.memory, self._batch.state
        else:
            memory = self.decoder.stack([r.run.step_memory for r in batch])
            state = torch.cat([s.state for s in samplers], dim=2)  # (S, L, B, H)
        tokens = torch.tensor([s.last for s in samplers])  # (B,)
        logits, weights, state = self.decoder.step(tokens, state, memory)  # (B, V), (B, N)
        self._batch = _Batch(members, memory, state)
        return logits, weights, state

    def _choose(self, reply: _Reply, rows: tuple[torch.Tensor, ...],
                out: list[tuple[_Reply, Any]], token: int | None = None,
                prob: float | None = None) -> None:
        """Hand a reply its row of the step, (1, V) logits, (1, N) weights and its state,
        and let it pick its next token (or take ``token`` with probability ``prob``,
        picked for it)."""
        reply.sampler.feed(*rows)
        self._emit(reply, reply.sampler.choose(token, prob), out)

    @staticmethod
    def _guarded(reply: _Reply, out: list[tuple[_Reply, Any]], fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            logger.exception("decoding a reply failed")
            out.append((reply, exc))

    def _emit(self, reply: _Reply, token: Token | None, out: list[tuple[_Reply, Any]],
              record: bool = True) -> None:
        if token is not None:
            if record:
                reply.run.record(token)
            out.append((reply, token))
        finished = token is None or (reply.sampler is not None and reply.sampler.done)
        if finished:
            out.append((reply, _END))

    def _deliver(self, out: list[tuple[_Reply, Any]]) -> None:
        """Hand tokens to their event loops (one wake-up per loop) and retire ended replies."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Reply, Any]]] = {}
        with self._cond:
            for reply, item in out:
                if isinstance(item, Token):
                    reply.unread += 1
                else:
                    reply.done = True
                by_loop.setdefault(reply.loop, []).append((reply, item))
            self._replies = [r for r in self._replies if not r.done]
        for loop, items in by_loop.items():
            _post(loop, self._hand_over, items)


def first_token(run: TurnRun) -> Token | None:
    """Choose (and record) a sampled reply's first token from the prompt's logits, on the
    model thread; ``None`` if it is the end of the reply. Unless that, or the reply is
    then done (:attr:`~mmchat.generate.Sampler.done`), the reply goes on in a batch."""
    assert run.generation.sampler is not None, "beam search chooses its own tokens"
    token = run.generation.sampler.choose()
    if token is not None:
        run.record(token)
    return token


def _group(jobs: list[_Job]) -> list[list[_Job]]:
    """Plain jobs one by one; batched jobs with the same ``fn`` together, at the place
    of the first of them."""
    groups: list[list[_Job]] = []
    batches: dict[Any, list[_Job]] = {}
    for job in jobs:
        if not job.batched:
            groups.append([job])
        elif job.fn in batches:
            batches[job.fn].append(job)
        else:
            batches[job.fn] = [job]
            groups.append(batches[job.fn])
    return groups


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed; nobody is listening any more
        logger.debug("dropped a result for a closed event loop")


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _settle_all(settled: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, result, exc in settled:
        _settle(future, result, exc)

