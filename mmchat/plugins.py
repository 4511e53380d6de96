"""Finding, loading and calling plugins.

Loading is explicit and idempotent: nothing happens at import. Sources, in order:
built-in modules, entry points in the ``mmchat`` group, and files or folders named
in configuration. ``MMCHAT_LOAD_PLUGINS`` (comma-separated names) allow-lists which
plugins load; ``MMCHAT_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError
from .isolation import split_settings
from .modality import Modality

if TYPE_CHECKING:
    from .config import Config

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mmchat"
ALLOW_ENV = "MMCHAT_LOAD_PLUGINS"
TRACE_ENV = "MMCHAT_TRACE_PLUGINS"
DEFAULT_PLUGINS: tuple[str, ...] = ("mmchat.builtins",)


@dataclass
class PluginInfo:
    name: str
    source: str
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    stage: str
    error: str


class PluginHost:
    """Owns a pluggy manager and everything the plugins registered."""

    def __init__(
        self,
        *,
        paths: Iterable[str | Path] = (),
        allow: Iterable[str] | None = None,
        block: Iterable[str] = (),
        entry_points: bool = True,
        builtins: Iterable[str] = DEFAULT_PLUGINS,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager("mmchat")
        self.pm.add_hookspecs(hookspecs)
        self._paths = [Path(p) for p in paths]
        env_allow = os.environ.get(ALLOW_ENV)
        if env_allow is not None:
            allow = [n.strip() for n in env_allow.split(",") if n.strip()]
        self._allow = None if allow is None else set(allow)
        self._block = set(block)
        self._entry_points = entry_points
        self._builtins = tuple(builtins)
        # the keys of [plugins.<name>] that the engine reads (timeout_seconds) are not theirs
        self._settings, _ = split_settings(settings or {})
        self._loaded = False
        self._seen: set[str] = set()  # every plugin name found, loaded or not
        self._info: dict[str, PluginInfo] = {}
        self._modalities: dict[str, Modality] | None = None
        self.failures: list[PluginFailure] = []
        if os.environ.get(TRACE_ENV):
            self.pm.trace.root.setwriter(lambda text: logger.info("%s", text.rstrip()))
            self.pm.enable_tracing()

    @classmethod
    def from_config(cls, config: "Config", **kwargs: Any) -> "PluginHost":
        """A host set up from ``[plugins]``: paths, allow- and block-lists, settings."""
        p = config.plugins
        return cls(paths=[config.resolve(path) for path in p.paths],
                   allow=list(p.enabled) or None, block=p.disabled, settings=p.settings,
                   **kwargs)

    # -- loading -----------------------------------------------------------------

    def load(self) -> "PluginHost":
        """Load every plugin once; later calls do nothing."""
        if self._loaded:
            return self
        self._loaded = True
        for module_name in self._builtins:
            self._load(module_name.rsplit(".", 1)[-1],
                       lambda m=module_name: importlib.import_module(m), "builtin", None,
                       always=True)
        if self._entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                version = ep.dist.version if ep.dist is not None else None
                source = f"entry point ({ep.dist.name})" if ep.dist is not None else "entry point"
                self._load(ep.name, ep.load, source, version)
        for path in self._paths:
            for file in _plugin_files(path):
                self._load(file.stem, lambda f=file: _import_file(f), f"path {file}", None)
        self._check_pending()
        for name in sorted((self._allow or set()) - self._seen):
            logger.error("plugin %r is enabled but not installed", name)
            self.failures.append(PluginFailure(
                name, "enabled", f"{ALLOW_ENV} or [plugins] enabled names {name!r}, but no "
                f"installed plugin has that name; installed: {', '.join(sorted(self._seen))}"))
        return self

    def _check_pending(self) -> None:
        """pluggy's ``check_pending``: a plugin with a hook that no hookspec names fails to
        load (unregistered), and the nearest real hook is suggested."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
                message = _unknown_hooks(self.pm, exc.plugin)
                logger.error("plugin %r: %s", name, message)
                self.pm.unregister(exc.plugin)
                self._info.pop(name, None)
                self.failures.append(PluginFailure(name, "load", message))

    def register(self, plugin: object, name: str, *, source: str = "registered",
                 version: str | None = None) -> None:
        """Register an already-imported plugin object (used by tests and embedders).

        Raises :class:`PluginError` if it implements a hook that no hookspec names.
        """
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            message = _unknown_hooks(self.pm, plugin)
            self.pm.unregister(plugin)
            raise PluginError(name, message) from None
        self._info[name] = PluginInfo(name=name, source=source, version=version)
        self._modalities = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._info.pop(name, None)
        self._modalities = None

    def _wanted(self, name: str) -> bool:
        self._seen.add(name)
        if name in self._block:
            return False
        return self._allow is None or name in self._allow

    def _load(self, name: str, loader: Callable[[], object], source: str, version: str | None,
              *, always: bool = False) -> None:
        if self.pm.has_plugin(name) or not (self._wanted(name) or always):
            return
        try:
            plugin = loader()
            self.pm.register(plugin, name=name)
        except Exception as exc:  # a broken plugin must not stop the others
            logger.exception("could not load plugin %r from %s", name, source)
            self.failures.append(PluginFailure(name, "load", f"{type(exc).__name__}: {exc}"))
            return
        if version is None:
            version = getattr(plugin, "__version__", None)
        self._info[name] = PluginInfo(name=name, source=source, version=version)

    # -- calling -----------------------------------------------------------------

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a hook, isolating failures per plugin.

        Each plugin is called through pluggy's hook caller (so ``MMCHAT_TRACE_PLUGINS``
        traces it) on its own. Returns ``(plugin_name, result)`` pairs for the plugins
        that did not raise; the ones that raised are logged and recorded in
        :attr:`failures`.
        """
        results = []
        for plugin_name, call in self.callers(hook_name):
            try:
                results.append((plugin_name, call(**kwargs)))
            except Exception as exc:
                logger.exception("plugin %r failed in %s", plugin_name, hook_name)
                self.failures.append(
                    PluginFailure(plugin_name, hook_name, f"{type(exc).__name__}: {exc}"))
        return results

    def callers(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """``(plugin_name, call)`` for each implementation of a hook, in pluggy's call
        order: ``call(**kwargs)`` runs that plugin's implementation alone, through the
        hook caller. Empty (and cheap) when no plugin implements the hook."""
        self.load()
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if not impls:
            return []
        if len(impls) == 1:
            return [(impls[0].plugin_name, _first(caller))]
        plugins = [impl.plugin for impl in impls]
        return [(impl.plugin_name, _first(self.pm.subset_hook_caller(
                    hook_name, [p for p in plugins if p is not impl.plugin])))
                for impl in reversed(impls)]

    @property
    def modalities(self) -> dict[str, Modality]:
        """Every registered modality by name, collected on first use."""
        if self._modalities is None:
            self._modalities = self._collect_modalities()
        return self._modalities

    def _collect_modalities(self) -> dict[str, Modality]:
        found: dict[str, Modality] = {}
        for info in self._info.values():
            info.modalities = []
        for plugin_name, call in self.callers("register_modalities"):
            registered: list[Modality] = []
            try:
                call(register=registered.append, settings=self._settings)
                for modality in registered:
                    _validate_modality(modality)
            except ConfigError:
                raise  # bad settings must stop start-up, naming the key
            except Exception as exc:
                logger.exception("plugin %r failed to register modalities", plugin_name)
                self.failures.append(PluginFailure(
                    plugin_name, "register_modalities", f"{type(exc).__name__}: {exc}"))
                continue
            for modality in registered:
                if modality.name in found:
                    logger.warning("modality %r registered twice; %r wins",
                                   modality.name, plugin_name)
                modality.plugin_name = plugin_name
                modality.plugin_version = self.plugin_version(plugin_name)
                found[modality.name] = modality
                if plugin_name in self._info:
                    self._info[plugin_name].modalities.append(modality.name)
        return found

    def plugin_version(self, plugin_name: str) -> str | None:
        info = self._info.get(plugin_name)
        return info.version if info else None

    def describe(self) -> list[PluginInfo]:
        """Every loaded plugin, with its hooks and modalities (for ``mmchat plugins``)."""
        self.load()
        _ = self.modalities
        out = []
        for name, plugin in self.pm.list_name_plugin():
            info = self._info.get(name) or PluginInfo(name=name, source="registered")
            info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            out.append(info)
        return sorted(out, key=lambda i: i.name)


def _validate_modality(modality: object) -> None:
    if not isinstance(modality, Modality):
        raise TypeError(f"register() expects a mmchat.Modality, got {type(modality).__name__}")
    if not modality.name or not modality.name.isidentifier():
        raise ValueError(f"modality name {modality.name!r} must be a Python identifier")
    if not modality.mime_types:
        raise ValueError(f"modality {modality.name!r} declares no MIME types")


def _plugin_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
    return [path]


def _import_file(path: Path) -> object:
    module_name = f"mmchat_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _first(caller: Any) -> Callable[..., Any]:
    """A hook caller for one implementation: its result rather than a list of one."""
    def call(**kwargs: Any) -> Any:
        results = caller(**kwargs)
        return results[0] if results else None
    return call


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> str:
    """The hooks of ``plugin`` that no hookspec names, each with the nearest real one."""
    real = [name for name in vars(pm.hook) if not name.startswith("_")
            and getattr(pm.hook, name).has_spec()]
    unknown = [c.name for c in pm.get_hookcallers(plugin) or [] if not c.has_spec()]
    hints = []
    for name in unknown:
        near = difflib.get_close_matches(name, real, n=1, cutoff=0.5)
        hints.append(f"unknown hook {name!r}: did you mean {near[0]!r}?" if near
                     else f"unknown hook {name!r}")
    return "; ".join(hints) + f" (the hooks are: {', '.join(sorted(real))})"
