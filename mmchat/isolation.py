"""What keeps a slow or broken modality plugin from hurting anyone but its own turn.

Each modality gets a lane of its own: a small thread pool for ``decode``
(``[plugins] decode_threads``) and one thread for its encoder (attachments of that
modality that arrive together are encoded in one call). A lane that is stuck holds only
that modality. Costly decodes (:meth:`Modality.is_costly`: a 40-megapixel picture) take
at most all but one of the lane's decode threads, so a cheap one is never queued behind
them, and the memory they take at once stays bounded. A client's
:class:`~mmchat.budget.DecodeAllowance` is charged the CPU time of its decodes.

Every call has a time limit (``[plugins.<name>] timeout_seconds``, default
``[plugins] timeout_seconds``); past it the turn fails with
:class:`~mmchat.errors.PluginTimeout`. What ``collate``, ``decode`` and the encoder
return is checked before anything is kept (:func:`check_features`,
:func:`check_encoded`). A modality that fails or times out
``breaker_failures`` times in a row is out of service (:class:`Breaker`) for
``breaker_cooldown_seconds``, then one call is let through to try it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .budget import DecodeAllowance
from .errors import (
    Cancelled,
    ConfigError,
    InputError,
    MMChatError,
    PluginError,
    PluginTimeout,
    PluginUnavailable,
    UnsupportedMedia,
)
from .modality import Attachment, Modality
from .threads import DaemonPool

if TYPE_CHECKING:
    import torch

    from .config import PluginsConfig

logger = logging.getLogger(__name__)

#: Keys of a ``[plugins.<name>]`` table that the host reads itself; the plugin never
#: sees them.
HOST_SETTINGS = ("timeout_seconds",)

#: Threads one modality's encoder batches run on: a batch of at least
#: ``ENCODE_THREADS * ENCODE_SPLIT`` items (a burst of pictures) is split among them, so
#: it uses more than one core (the encoder's torch ops release the interpreter lock).
ENCODE_THREADS = 2
ENCODE_SPLIT = 4

T = TypeVar("T")


def split_settings(settings: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``[plugins.<name>]`` tables split into what the plugin gets and what the host keeps
    (checked: ``timeout_seconds`` is a positive number)."""
    plugin: dict[str, dict[str, Any]] = {}
    host: dict[str, dict[str, Any]] = {}
    for name, table in settings.items():
        plugin[name] = {k: v for k, v in table.items() if k not in HOST_SETTINGS}
        host[name] = {k: v for k, v in table.items() if k in HOST_SETTINGS}
        value = host[name].get("timeout_seconds", 1.0)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"plugins.{name}.timeout_seconds = {value!r} is not allowed: "
                              "expected a positive number of seconds")
    return plugin, host


def choose_modality(modalities: Mapping[str, Modality], attachment: Attachment,
                    served: Mapping[str, Any] | None = None) -> Modality:
    """The modality an attachment goes to.

    An explicit ``attachment.modality`` must name a modality that takes its MIME type.
    Otherwise, among the modalities that take the type and that the loaded model has
    (``served``; every one when ``None``): the highest :attr:`Modality.priority`, then
    the first name in alphabetical order.
    """
    mime = attachment.mime_type
    if attachment.modality is not None:
        modality = modalities.get(attachment.modality)
        if modality is None:
            raise UnsupportedMedia(f"unknown modality {attachment.modality!r}; this server "
                                   f"accepts: {', '.join(sorted(modalities)) or 'none'}")
        if not modality.accepts(mime):
            raise UnsupportedMedia(f"modality {modality.name!r} does not accept {mime!r}; "
                                   f"it accepts {', '.join(modality.mime_types)}")
        if served is not None and modality.name not in served:
            raise UnsupportedMedia(f"the loaded model was not trained with modality "
                                   f"{modality.name!r}")
        return modality
    matches = [m for m in modalities.values() if m.accepts(mime)]
    usable = [m for m in matches if served is None or m.name in served]
    if not usable:
        if matches:
            raise UnsupportedMedia(
                f"the loaded model was not trained with a modality that takes {mime!r} "
                f"(installed: {', '.join(sorted(m.name for m in matches))})")
        accepted = sorted(t for m in modalities.values()
                          if served is None or m.name in served for t in m.mime_types)
        raise UnsupportedMedia(f"no modality accepts MIME type {mime!r}; "
                               f"accepted: {', '.join(accepted) or 'none'}")
    return min(usable, key=lambda m: (-m.priority, m.name))


# -- output checks -------------------------------------------------------------------


class BadOutput(Exception):
    """A plugin returned something that breaks a rule; ``rule`` names it."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} (rule: {rule})")
        self.rule = rule


def check_features(features: Any) -> "torch.Tensor":
    """What ``decode`` returns: a non-empty, finite float32 tensor."""
    import torch

    if not isinstance(features, torch.Tensor):
        raise BadOutput("tensor", f"decode returned {type(features).__name__}, "
                                  "not a torch.Tensor")
    if features.dtype != torch.float32:
        raise BadOutput("float32", f"decode returned dtype {features.dtype}, not torch.float32")
    if features.dim() == 0 or features.numel() == 0:
        raise BadOutput("non_empty", f"decode returned shape {tuple(features.shape)}; it "
                                     "needs at least one axis and one value")
    if not bool(torch.isfinite(features).all()):
        raise BadOutput("finite", "decode returned NaN or infinite values")
    return features


def check_batch(batch: Any, n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """What ``collate`` returns for ``n`` items: ``(batch (n, ...), lengths (n,) long)``."""
    import torch

    if not (isinstance(batch, tuple) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)):
        raise BadOutput("collate", "collate must return (batch, lengths), two tensors")
    x, lengths = batch
    if (x.dim() == 0 or x.shape[0] != n or tuple(lengths.shape) != (n,)
            or lengths.is_floating_point()):
        raise BadOutput("collate", f"collate returned shapes {tuple(x.shape)} and "
                                   f"{tuple(lengths.shape)} {lengths.dtype} for {n} items; "
                                   f"expected ({n}, ...) and ({n},) integers")
    return x, lengths


def check_encoded(out: Any, n: int, d_model: int) -> list["torch.Tensor"]:
    """What an encoder returns for ``n`` items: ``(vectors (n, N, d_model), mask (n, N))``
    with finite real vectors; each item's real vectors, ``(N_i, d_model)``."""
    import torch

    if not (isinstance(out, tuple) and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)):
        raise BadOutput("encoder_output", "the encoder must return (vectors, mask), "
                                          "two tensors")
    vectors, mask = out
    if not vectors.is_floating_point():
        raise BadOutput("float", f"the encoder returned vectors of dtype {vectors.dtype}")
    if vectors.dim() != 3 or vectors.shape[0] != n or vectors.shape[2] != d_model:
        raise BadOutput("shape", f"the encoder returned vectors of shape "
                                 f"{tuple(vectors.shape)}; expected ({n}, N, {d_model})")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(vectors.shape[:2]):
        raise BadOutput("mask", f"the encoder returned a {mask.dtype} mask of shape "
                                f"{tuple(mask.shape)}; expected bool ({n}, "
                                f"{vectors.shape[1]})")
    real = [v[m] for v, m in zip(vectors, mask)]
    if not all(bool(torch.isfinite(v).all()) for v in real):
        raise BadOutput("finite", "the encoder returned NaN or infinite vectors")
    return real


# -- circuit breaker -----------------------------------------------------------------


@dataclass
class Breaker:
    """Opens after ``threshold`` failures in a row; after ``cooldown`` seconds one call
    is let through (half open): it closes the breaker if it succeeds, else reopens it."""

    threshold: int
    cooldown: float
    clock: Callable[[], float] = time.monotonic
    streak: int = 0  # failures in a row
    failures: int = 0  # all failures so far
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def retry_in(self) -> float:
        """Seconds until the breaker lets a call through again (0 when it does)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))

    def admit(self) -> bool:
        """Whether a call may run now (taking the one probe of a half-open breaker)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.streak = 0
        self.opened_at = None
        self.probing = False

    def release(self) -> None:
        """A call that neither failed nor succeeded (bad input, cancelled) ended: a probe
        may be tried again."""
        self.probing = False

    def failed(self) -> None:
        self.streak += 1
        self.failures += 1
        if self.probing or self.streak >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False


# -- lanes ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Lane:
    """One modality's threads, time limit and breaker."""

    modality: Modality
    timeout: float
    breaker: Breaker
    decode_threads: int
    decode_pool: DaemonPool = field(init=False)
    encode_pool: DaemonPool = field(init=False)
    #: The other threads a big batch is split among.
    encode_helpers: DaemonPool = field(init=False)
    encoders: Any = field(init=False)  # batching.DecodeScheduler without a decoder
    #: Costly decodes hold one of these from before they are queued until their thread
    #: is done with them (even past their time limit): all threads but one.
    costly: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        from .batching import DecodeScheduler

        name = self.modality.name
        self.decode_pool = DaemonPool(self.decode_threads, f"mmchat-decode-{name}")
        self.encode_pool = DaemonPool(1, f"mmchat-encode-{name}")
        self.encode_helpers = DaemonPool(ENCODE_THREADS - 1, f"mmchat-encode-{name}-more")
        self.encoders = DecodeScheduler(None, self.encode_pool)
        self.costly = asyncio.Semaphore(self.decode_threads - 1)

    @property
    def plugin(self) -> str:
        return self.modality.plugin_name or self.modality.name


class PluginGuard:
    """Runs modality plugin code for an engine: each modality in its own lane, every call
    with a time limit, its output checked, a breaker around it.

    ``encoders`` maps a modality name to its encoder module (the model's); ``d_model``
    is what every encoder must return per vector. ``settings`` is ``[plugins]``.
    ``extend(modality, vectors, mask)``, if given, adds the model's own vectors to an
    encoder output once it has passed the checks (the object slots,
    :meth:`mmchat.model.DialogueLM.with_objects`).
    """

    def __init__(self, modalities: Mapping[str, Modality], encoders: Mapping[str, Any],
                 d_model: int, settings: "PluginsConfig",
                 clock: Callable[[], float] = time.monotonic,
                 extend: Callable[[str, Any, Any], tuple[Any, Any]] | None = None) -> None:
        self.d_model = d_model
        self._encoders = dict(encoders)
        self._extend = extend
        self._lanes: dict[str, _Lane] = {}
        _, own = split_settings(settings.settings)
        for name, modality in modalities.items():
            limit = own.get(name, {}).get("timeout_seconds", settings.timeout_seconds)
            self._lanes[name] = _Lane(modality, float(limit),
                                      Breaker(settings.breaker_failures,
                                              settings.breaker_cooldown_seconds, clock),
                                      settings.decode_threads)

    def timeout(self, modality: str) -> float:
        return self._lanes[modality].timeout

    async def decode(self, modality: Modality, attachment: Attachment,
                     allowance: DecodeAllowance | None = None) -> "torch.Tensor":
        """``modality.decode`` in its lane, limited and checked; its CPU time is charged
        to ``allowance``, which must have time left (else :class:`MediaBusy`)."""
        lane = self._lanes[modality.name]
        if allowance is not None:
            allowance.admit()
        return await self._guarded(lane, "decode", lambda: self._decode(
            lane, allowance, attachment))

    async def _decode(self, lane: _Lane, allowance: DecodeAllowance | None,
                      attachment: Attachment) -> "torch.Tensor":
        """Queue the decode (a costly one once it holds ``lane.costly``) and wait for it.
        Whatever happens to this wait, the thread's end releases the hold and charges
        the allowance."""
        loop = asyncio.get_running_loop()
        modality = lane.modality
        costly = run_plugin(modality, "is_costly", lambda: bool(
            modality.is_costly(attachment.data, attachment.mime_type)))
        if costly:
            await lane.costly.acquire()
        spent: list[float] = []

        def ended() -> None:  # on the event loop, once the thread is done with it
            if costly:
                lane.costly.release()
            if allowance is not None and spent:
                allowance.charge(spent[0])

        try:
            future = lane.decode_pool.submit(_timed_decode, modality, attachment.data,
                                             attachment.mime_type, spent)
        except BaseException:
            ended()
            raise
        future.add_done_callback(lambda _: _call_soon(loop, ended))
        return await asyncio.wrap_future(future)

    async def encode(self, modality: Modality, features: "torch.Tensor") -> "torch.Tensor":
        """The item's vectors ``(N, d_model)`` from the modality's encoder, in its lane,
        batched with the items of other turns that wait meanwhile."""
        lane = self._lanes[modality.name]
        return await self._guarded(lane, "encoder", lambda: lane.encoders.call_batched(
            self._encode_batch, (modality, features)))

    async def _guarded(self, lane: _Lane, what: str, start: Callable[[], Awaitable[T]]) -> T:
        """``await start()`` unless the breaker is open, within the lane's time limit."""
        if not lane.breaker.admit():
            raise PluginUnavailable(
                lane.plugin, f"modality {lane.modality.name!r} is out of service after "
                f"{lane.breaker.streak} failures in a row; it is tried again in "
                f"{lane.breaker.retry_in():.0f}s")
        try:
            result = await asyncio.wait_for(start(), lane.timeout)
        except TimeoutError:
            lane.breaker.failed()
            logger.warning("plugin %r: %s of modality %r took longer than %gs", lane.plugin,
                           what, lane.modality.name, lane.timeout)
            raise PluginTimeout(lane.plugin, f"{what} of modality {lane.modality.name!r} took "
                                f"longer than {lane.timeout:g}s (plugins.{lane.modality.name}"
                                ".timeout_seconds)") from None
        except PluginError:
            lane.breaker.failed()
            raise
        except (InputError, Cancelled):
            raise  # the payload's fault, or the engine closing: not the plugin's
        except MMChatError:
            lane.breaker.failed()
            raise
        finally:
            lane.breaker.release()
        lane.breaker.succeeded()
        return result

    def _encode_batch(self, items: list[tuple[Modality, "torch.Tensor"]]) -> list[Any]:
        """On a lane's encoder thread: each item's vectors, or the exception its encoding
        raised. One call for all, then one per item if that failed, so a bad item fails
        only its own turn."""
        modality = items[0][0]
        try:
            return self._encode_split(modality, [f for _, f in items])
        except Exception:
            if len(items) == 1:
                raise
        out: list[Any] = []
        for _, f in items:
            try:
                out.append(self._encode(modality, [f])[0])
            except Exception as exc:
                out.append(exc)
        return out

    def _encode_split(self, modality: Modality, features: list["torch.Tensor"]
                      ) -> list["torch.Tensor"]:
        """:meth:`_encode` for a batch, in parts on the lane's threads when it is big."""
        parts = min(ENCODE_THREADS, len(features) // ENCODE_SPLIT)
        if parts < 2:
            return self._encode(modality, features)
        size = -(-len(features) // parts)
        chunks = [features[i:i + size] for i in range(0, len(features), size)]
        helpers = self._lanes[modality.name].encode_helpers
        futures = [helpers.submit(self._encode, modality, chunk) for chunk in chunks[1:]]
        try:
            out = self._encode(modality, chunks[0])
        finally:
            concurrent.futures.wait(futures)  # no part left running when one failed
        for future in futures:
            out += future.result()
        return out

    def _encode(self, modality: Modality, features: list["torch.Tensor"]
                ) -> list["torch.Tensor"]:
        import torch

        encoder = self._encoders[modality.name]
        n = len(features)
        with torch.inference_mode():
            out = run_plugin(modality, "encoder", lambda: encoder(
                *check_batch(modality.collate(features), n)))
            real = run_plugin(modality, "encoder", lambda: check_encoded(out, n, self.d_model))
            if self._extend is None:
                return real
            vectors, mask = self._extend(modality.name, *out)
            return [v[m] for v, m in zip(vectors, mask)]

    def health(self) -> list[dict[str, Any]]:
        """Each modality's plugin, breaker state, failures and time limit."""
        return [{"modality": name, "plugin": lane.plugin, "state": lane.breaker.state,
                 "failures": lane.breaker.failures, "retry_in": lane.breaker.retry_in(),
                 "timeout_seconds": lane.timeout}
                for name, lane in sorted(self._lanes.items())]

    def encoder_pools(self) -> list[DaemonPool]:
        """The threads that run the model's encoders (torch, never plugin code): an
        exit may wait for them, as it may not for a plugin's decode."""
        return [pool for lane in self._lanes.values()
                for pool in (lane.encode_pool, lane.encode_helpers)]

    def close(self) -> None:
        """Stop every lane without waiting for a call that overran (never blocks)."""
        for lane in self._lanes.values():
            lane.encoders.close()
            lane.decode_pool.shutdown(wait=False, cancel_futures=True)
            lane.encode_pool.shutdown(wait=False, cancel_futures=True)
            lane.encode_helpers.shutdown(wait=False, cancel_futures=True)


def _timed_decode(modality: Modality, data: bytes, mime_type: str,
                  spent: list[float]) -> "torch.Tensor":
    """On a decode thread: the checked decode; the CPU seconds it took go into ``spent``."""
    start = time.thread_time()
    try:
        return run_plugin(modality, "decode",
                          lambda: check_features(modality.decode(data, mime_type)))
    finally:
        spent.append(time.thread_time() - start)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """``fn()`` on ``loop`` (from any thread); nothing if the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:
        logger.debug("the event loop closed before a decode ended")


def run_plugin(modality: Modality, what: str, fn: Callable[[], T]) -> T:
    """Run a modality's own code: a :class:`BadOutput` or an unexpected exception becomes a
    :class:`PluginError` naming the plugin (the rule it broke, or what it raised)."""
    plugin = modality.plugin_name or modality.name
    try:
        return fn()
    except MMChatError:
        raise
    except BadOutput as exc:
        logger.warning("plugin %r broke a rule in %s: %s", plugin, what, exc)
        raise PluginError(plugin, f"{what}: {exc}") from None
    except Exception as exc:
        logger.exception("modality %r raised in %s", modality.name, what)
        raise PluginError(plugin, f"{what} raised {type(exc).__name__}: {exc}") from exc


async def until_cancelled(work: Awaitable[T], cancelled: asyncio.Event) -> T:
    """``await work``, unless ``cancelled`` is set first: then :class:`Cancelled`."""
    task = asyncio.ensure_future(work)
    if cancelled.is_set():
        task.cancel()
        raise Cancelled("the reply was cancelled")
    waiter = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        raise Cancelled("the reply was cancelled")
    return task.result()

