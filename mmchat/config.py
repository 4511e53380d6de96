"""Typed, frozen configuration loaded from TOML, with environment overrides.

``config.toml`` documents every setting. ``MMCHAT_<SECTION>__<KEY>`` overrides one
(``MMCHAT_MODEL__RNN=gru``). A bad value fails at start-up with a :class:`ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "MMCHAT_"


def _opt(default: Any, *, choices: tuple[Any, ...] | None = None, min: float | None = None,
         max: float | None = None) -> Any:
    meta = {"choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str = _opt("bundled")
    rnn: str = _opt("lstm", choices=("lstm", "gru"))
    n_layer: int = _opt(2, min=1, max=8)
    n_embd: int = _opt(256, min=8, max=4096)
    n_hidden: int = _opt(512, min=8, max=8192)
    d_model: int = _opt(256, min=8, max=4096)
    dropout: float = _opt(0.1, min=0.0, max=0.9)
    vocab_size: int = _opt(4000, min=32, max=65536)
    device: str = _opt("cpu")
    threads: int = _opt(1, min=0, max=256)
    quantize: str = _opt("none", choices=("none", "dynamic-int8"))
    fast_decode: bool = _opt(True)


@dataclass(frozen=True)
class FusionConfig:
    method: str = _opt("attention", choices=("attention", "concat", "weighted"))
    condition: bool = _opt(True)
    max_memory: int = _opt(16, min=1, max=4096)
    entry_tags: int = _opt(8, min=0, max=64)
    carry_query: bool = _opt(True)
    select_entries: bool = _opt(True)
    summaries: bool = _opt(True)
    reread: bool = _opt(False)
    object_slots: int = _opt(0, min=0, max=64)
    object_order: str = _opt("data", choices=("data", "any"))


#: What the bot says in place of a reply it is not sure of (``[generation] fallback_text``).
FALLBACK_TEXT = ("sorry, i can't help with that. i can tell you about the shapes or the digit "
                 "in a picture you send, in writing or out loud.")


@dataclass(frozen=True)
class GenerationConfig:
    strategy: str = _opt("greedy", choices=("greedy", "sample", "beam"))
    temperature: float = _opt(1.0, min=1e-4, max=100.0)
    top_k: int = _opt(0, min=0)
    top_p: float = _opt(1.0, min=0.0, max=1.0)
    beam_width: int = _opt(4, min=1, max=64)
    no_repeat_ngram: int = _opt(0, min=0, max=16)
    max_new_tokens: int = _opt(64, min=1, max=4096)
    stop: tuple[str, ...] = _opt(())
    seed: int = _opt(-1, min=-1)
    loop_ngram: int = _opt(4, min=0, max=16)
    fallback_threshold: float = _opt(-1.0, min=-1.0, max=1.0)
    fallback_text: str = _opt(FALLBACK_TEXT)


@dataclass(frozen=True)
class PluginsConfig:
    enabled: tuple[str, ...] = _opt(())
    disabled: tuple[str, ...] = _opt(())
    paths: tuple[str, ...] = _opt(())
    settings: Mapping[str, Mapping[str, Any]] = _opt({})
    timeout_seconds: float = _opt(60.0, min=0.001)
    breaker_failures: int = _opt(5, min=1)
    breaker_cooldown_seconds: float = _opt(30.0, min=0.0)
    decode_threads: int = _opt(2, min=2, max=64)


@dataclass(frozen=True)
class SessionsConfig:
    backend: str = _opt("memory", choices=("memory", "redis"))
    url: str = _opt("redis://127.0.0.1:6379/0")
    prefix: str = _opt("mmchat")
    ttl_seconds: int = _opt(86_400, min=1)
    max_connections: int = _opt(32, min=1)
    lock_lease_seconds: float = _opt(5.0, min=1.0)
    lock_wait_seconds: float = _opt(10.0, min=0.0)
    pool_timeout_seconds: float = _opt(5.0, min=0.0)
    socket_timeout_seconds: float = _opt(5.0, min=0.1)
    connect_timeout_seconds: float = _opt(2.0, min=0.1)
    stream_max_len: int = _opt(2048, min=16)
    max_sessions: int = _opt(10_000, min=1)
    history_max_len: int = _opt(1024, min=2)
    message_ids_max_len: int = _opt(1024, min=16)


@dataclass(frozen=True)
class LimitsConfig:
    max_text_chars: int = _opt(4000, min=1)
    max_attachments: int = _opt(4, min=0, max=64)


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1")
    port: int = _opt(8765, min=0, max=65535)
    max_event_bytes: int = _opt(1_048_576, min=1024)
    max_attachment_bytes: int = _opt(16_777_216, min=1024)
    max_message_bytes: int = _opt(33_554_432, min=1024)
    messages_per_second: float = _opt(1.0, min=0.001)
    burst: int = _opt(5, min=1)
    media_decode_seconds: float = _opt(8.0, min=0.000001)
    media_decode_rate: float = _opt(0.5, min=0.000001)
    max_strikes: int = _opt(20, min=1)
    max_connections: int = _opt(1000, min=1)
    origins: tuple[str, ...] = _opt(())
    auth_secret_env: str = _opt("")
    hello_timeout_seconds: float = _opt(10.0, min=0.1)
    ping_interval_seconds: float = _opt(20.0, min=0.0)
    ping_timeout_seconds: float = _opt(20.0, min=0.1)
    drain_seconds: float = _opt(30.0, min=0.0)
    resume_idle_seconds: float = _opt(30.0, min=0.1)
    coalesce: int = _opt(1, min=1, max=256)
    web: bool = _opt(True)
    workers: int | str = _opt(1, choices=("auto",), min=1, max=1024)
    event_loop: str = _opt("auto", choices=("auto", "asyncio", "uvloop"))
    #: The HTTP port of the OpenAI-compatible endpoint (and the page): -1 off, 0 a free one.
    http_port: int = _opt(-1, min=-1, max=65535)
    #: The model name /v1/models lists and completions answer with.
    openai_model: str = _opt("mmchat")
    #: Whether image_url parts may name http(s) URLs for the server to fetch.
    openai_remote_urls: bool = _opt(False)
    #: Completions per second each caller (token subject, or address) may request.
    openai_requests_per_second: float = _opt(10.0, min=0.001)
    #: Completions a caller may request at once above that rate.
    openai_burst: int = _opt(40, min=1)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _opt(6000, min=1)
    batch_size: int = _opt(64, min=1, max=65536)
    lr: float = _opt(2e-3, min=0.0, max=1.0)
    min_lr_ratio: float = _opt(0.1, min=0.0, max=1.0)
    warmup_steps: int = _opt(200, min=0)
    weight_decay: float = _opt(0.0, min=0.0, max=1.0)
    grad_clip: float = _opt(1.0, min=0.0)
    eval_every: int = _opt(250, min=1)
    eval_batches: int = _opt(20, min=1)
    checkpoint_every: int = _opt(500, min=1)
    patience: int = _opt(6, min=0)
    max_tokens: int = _opt(256, min=8, max=65536)
    aux_weight: float = _opt(1.0, min=0.0)
    transcript_weight: float = _opt(1.0, min=0.0)
    objects_weight: float = _opt(1.0, min=0.0)
    augment: bool = _opt(True)
    category_weights: Mapping[str, float] = _opt({})
    freeze: tuple[str, ...] = _opt(())
    init_parts: tuple[str, ...] = _opt(())
    seed: int = _opt(1337, min=0)
    threads: int = _opt(0, min=0, max=256)
    fallback_threshold: float = _opt(0.0, min=0.0, max=1.0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Folder that relative paths in the file are resolved against.
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or single settings changed.

        ``config.replace(model={"rnn": "gru"})`` validates like a file would.
        """
        data = self.to_dict()
        for name, value in sections.items():
            if isinstance(value, Mapping):
                data.setdefault(name, {}).update(value)
            else:
                data[name] = value
        return from_dict(data, base_dir=self.base_dir, env={})

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = _section_to_dict(value)
        return out


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
        out[f.name] = value
    return out


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING
}


def load(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or built-in defaults when ``None``) and apply environment overrides."""
    data: dict[str, Any] = {}
    base_dir = "."
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        base_dir = str(path.resolve().parent)
    return from_dict(data, base_dir=base_dir, env=os.environ if env is None else env)


def from_dict(data: Mapping[str, Any], *, base_dir: str = ".",
              env: Mapping[str, str] | None = None) -> Config:
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for key, raw in (env or {}).items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
        if section not in SECTIONS:
            continue
        data.setdefault(section, {})[name] = _EnvValue(raw)
    sections = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section [{name}]; allowed: {', '.join(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"config [{name}] must be a table, got {table!r}")
        sections[name] = _build(SECTIONS[name], name, table)
    return Config(base_dir=base_dir, **sections)


class _EnvValue(str):
    """A raw string from the environment, converted by the field's type."""


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A section's resolved field types (resolving them costs more than the rest of a build)."""
    return typing.get_type_hints(cls)


def _build(cls: type, section: str, table: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    values = {}
    extra = {}
    for key, value in table.items():
        if key not in fields:
            if cls is PluginsConfig and isinstance(value, Mapping):
                extra[key] = dict(value)  # [plugins.<name>] tables are plugin settings
                continue
            raise ConfigError(
                f"unknown setting {section}.{key}; allowed: {', '.join(fields)}")
        values[key] = _check(f"{section}.{key}", value, hints[key], fields[key].metadata)
    if extra:
        merged = dict(values.get("settings", {}))
        merged.update(extra)
        values["settings"] = merged
    return cls(**values)


def _check(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    try:
        if isinstance(value, _EnvValue):
            value = _from_env(value, hint)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError("a boolean (true or false)")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError("an integer")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError("a number")
            value = float(value)
        elif hint is str:
            if not isinstance(value, str):
                raise TypeError("a string")
        elif hint == int | str:  # a number or a word (`workers = 4` or `"auto"`)
            if (isinstance(value, bool) or not isinstance(value, (int, str))
                    or isinstance(value, str) and value not in meta["choices"]):
                raise TypeError(" or ".join(["a whole number", *map(repr, meta["choices"])]))
        elif origin is tuple:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of strings")
            value = tuple(value)
        elif origin is Mapping or hint is Mapping:
            value = _check_table(value, typing.get_args(hint))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} = {value!r} is not allowed: expected {exc}") from None
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if hint == int | str:
        if isinstance(value, str):
            return value  # one of the words, checked above; min and max are for numbers
    elif choices and value not in choices:
        raise ConfigError(
            f"{key} = {value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")
    if lo is not None and value < lo:
        raise ConfigError(f"{key} = {value!r} is not allowed: minimum is {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r} is not allowed: maximum is {hi}")
    return value


def _check_table(value: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError("a table")
    if args and args[1] is float:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                   for v in value.values()):
            raise TypeError("a table of numbers >= 0")
        return {str(k): float(v) for k, v in value.items()}
    if not all(isinstance(v, Mapping) for v in value.values()):
        raise TypeError("a table of tables")
    return {k: dict(v) for k, v in value.items()}


def _from_env(raw: str, hint: Any) -> Any:
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("a boolean (true or false)")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("an integer") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("a number") from None
    if hint == int | str:
        return int(raw) if raw.strip().lstrip("-").isdigit() else raw.strip()
    if typing.get_origin(hint) is Mapping:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError("a JSON object") from None
    if typing.get_origin(hint) is tuple:
        if raw.strip().startswith("["):
            return json.loads(raw)
        return [part.strip() for part in raw.split(",") if part.strip()]
    return str(raw)
