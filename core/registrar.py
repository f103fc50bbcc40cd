"""Typed registrars handed to the registration hooks: plugins add named kinds of things through them.

One generic registrar serves the five families (backends, gates, distillers, loggers, quality terms). Each
registration is a factory plus the pydantic model of its settings; nothing is built until a session
needs it, so `attnplug plugins list` can show what every plugin registers without running it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One named thing a plugin offers: `factory(settings, context) -> T`."""

    family: str
    name: str
    factory: Callable[[Any, Any], T]
    settings: type[BaseModel] | None
    plugin: str
    doc: str = ""


@dataclass
class Registrar(Generic[T]):
    """Collects registrations of one family. Duplicate names raise, naming both plugins."""

    family: str
    entries: dict[str, Registration[T]] = field(default_factory=dict)
    plugin: str = "<unknown>"  # set by the plugin manager while it calls each plugin's hook

    def add(self, name: str, factory: Callable[[Any, Any], T], settings: type[BaseModel] | None = None,
            doc: str = "") -> None:
        """Register `name`. `factory(settings, context)` builds it; `settings` is its config model.

        :param name: the name users write in the config (e.g. `"ttr"`, `"sigma_window"`).
        :param factory: called with the validated settings (an instance of `settings`, or None)
            and the build context (the session being built).
        :param settings: pydantic model of this thing's settings, `extra="forbid"`.
        :param doc: one line shown by `attnplug plugins list`.
        """
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"plugin {self.plugin!r}: invalid {self.family} name {name!r} "
                             "(letters, digits, '_' and '-')")
        old = self.entries.get(name)
        if old is not None:
            raise ValueError(f"{self.family} {name!r} registered twice: by plugin {old.plugin!r} "
                             f"and by plugin {self.plugin!r}")
        self.entries[name] = Registration(self.family, name, factory, settings, self.plugin, doc)

    def get(self, name: str) -> Registration[T]:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} {name!r}; registered: {sorted(self.entries)}") from None

    def names(self) -> list[str]:
        return sorted(self.entries)


# Readable aliases for the hook signatures.
BackendRegistrar = Registrar  # Registrar[Backend]
GateRegistrar = Registrar  # Registrar[Gate]
DistillerRegistrar = Registrar  # Registrar[Distiller]
LoggerRegistrar = Registrar  # Registrar[Logger]
QualityTermRegistrar = Registrar  # Registrar[QualityTerm]
