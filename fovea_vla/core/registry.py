"""Backend registries: pick an implementation of a stage by name, or let ``auto`` choose.

Each accelerated stage (flow, texture, decode, ...) owns one :class:`BackendRegistry`. Backends
register a factory under a name together with an availability check that returns ``(ok, reason)``
without raising, so ``auto`` can fall through a fixed preference order and say why it picked
what it picked. A backend that works here but should not be an ``auto`` pick (a GPU backend
falling back to a slow CPU path, say) also registers a ``when_named`` check, used instead when
the backend is asked for by name.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Availability", "BackendRegistry", "BackendSelection"]

Availability = tuple[bool, str]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSelection:
    """The backend a stage will use and the one-line reason it was chosen."""

    name: str
    reason: str


@dataclass(frozen=True)
class _Entry:
    factory: Callable
    is_available: Callable[[], Availability]
    when_named: Callable[[], Availability] | None = None


class BackendRegistry:
    """Names -> backend factories for one pipeline stage.

    Args:
        stage: stage name used in messages ("flow", "texture", ...).
        auto_order: preference order for ``auto``, best first.
        modules: modules that register backends when imported, imported lazily on first use so
            that optional dependencies (CuPy, VPI, OpenGL) cost nothing until asked for.
    """

    def __init__(self, stage: str, auto_order: Sequence[str], modules: Sequence[str]):
        self.stage = stage
        self.auto_order = tuple(auto_order)
        self._modules = tuple(modules)
        self._entries: dict[str, _Entry] = {}
        self._loaded = False
        self._logged_auto: set[tuple[str, ...]] = set()

    def register(
        self,
        name: str,
        is_available: Callable[[], Availability],
        *,
        when_named: Callable[[], Availability] | None = None,
    ):
        """Decorator registering ``factory`` under ``name``.

        Args:
            name: backend name.
            is_available: ``() -> (ok, reason)``: whether ``auto`` may pick the backend here, and
                what :meth:`report` shows.
            when_named: ``() -> (ok, reason)`` used instead of ``is_available`` when the backend
                is asked for by name; None = the same check. For backends usable on request but
                not an ``auto`` choice here (``is_available`` then gives the reason ``auto``
                skips them).
        """

        def decorator(factory):
            if name in self._entries:
                raise ValueError(f"{self.stage} backend {name!r} registered twice")
            self._entries[name] = _Entry(factory, is_available, when_named)
            return factory

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                # A backend module whose own imports fail is reported as unavailable below.
                _LOG.debug("%s backend module %s not importable: %s", self.stage, module, exc)

    def names(self) -> list[str]:
        """Registered backend names."""
        self._load()
        return sorted(self._entries)

    def check_name(self, name: str, *, field: str = "backend") -> None:
        """Raise ``ValueError`` naming the known backends (and the closest one) for an unknown name."""
        known = [*self.names(), "auto"]
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{field}={name!r} is not a known {self.stage} backend ({', '.join(known)}){hint}")

    def availability(self, name: str, *, named: bool = False) -> Availability:
        """``(ok, reason)`` for one backend; never raises.

        Args:
            name: backend name.
            named: check for an explicit request by name (the backend's ``when_named`` check
                where it registered one) instead of for ``auto``.
        """
        self._load()
        entry = self._entries.get(name)
        if entry is None:
            return False, f"backend {name!r} is not installed with this package (module failed to import)"
        check = entry.when_named if named and entry.when_named is not None else entry.is_available
        try:
            return check()
        except Exception as exc:  # an availability probe must never take a node down
            return False, f"availability check failed: {type(exc).__name__}: {exc}"

    def report(self) -> dict[str, Availability]:
        """Availability of every backend in preference order (for ``fovea-vla doctor``)."""
        self._load()
        order = [n for n in self.auto_order if n in self._entries]
        order += [n for n in sorted(self._entries) if n not in order]
        return {name: self.availability(name) for name in order}

    def select(self, name: str, *, field: str = "backend") -> BackendSelection:
        """Resolve ``name`` (possibly ``auto``) to an available backend.

        Raises:
            ValueError: unknown name.
            RuntimeError: the named backend (or every ``auto`` candidate) is unavailable.
        """
        self.check_name(name, field=field)
        if name != "auto":
            ok, reason = self.availability(name, named=True)
            if not ok:
                raise RuntimeError(f"{self.stage} backend {name!r} is unavailable: {reason}")
            return BackendSelection(name, "configured")
        skipped = []
        self._load()
        for candidate in self.auto_order:
            if candidate not in self._entries:
                continue  # not part of this build (e.g. a backend planned for another platform)
            ok, reason = self.availability(candidate)
            if ok:
                why = "auto: first available"
                if skipped:
                    why += " (skipped " + "; ".join(skipped) + ")"
                key = (candidate, *skipped)
                if key not in self._logged_auto:
                    self._logged_auto.add(key)
                    _LOG.info("%s backend auto -> %s: %s", self.stage, candidate, why)
                return BackendSelection(candidate, why)
            skipped.append(f"{candidate}: {reason}")
        raise RuntimeError(f"no {self.stage} backend available: " + "; ".join(skipped))

    def create(self, name: str, *args, **kwargs):
        """Instantiate the backend registered under ``name`` (already resolved, not ``auto``)."""
        self._load()
        return self._entries[name].factory(*args, **kwargs)
