"""attnplug's core: call records, backends, gates, config, plugin manager, session, checkpoints."""
from .backend import Backend, BackendRegistry, Capabilities, HostAttention, LearnedBackend, StagedState
from .call import AttentionCall, LayerSpec
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, SessionConfig, Strict, load_config
from .gates import ALLOW, Gate, GateDecision, Route, Router, force, veto
from .hookspecs import hookimpl, hookspec
from .loggers import ImageLogger, Logger, LoggerFanout
from .plugins import Plugins, get_plugins
from .registrar import Registrar
from .session import ApproximationError, LayerStats, RunInfo, Session, load

__all__ = [
    "ALLOW", "ApproximationError", "AttentionCall", "Backend", "BackendRegistry", "Capabilities", "CheckpointError",
    "Config", "ConfigError", "Gate", "GateDecision", "HostAttention", "ImageLogger", "LayerSpec", "LayerStats", "LearnedBackend",
    "Logger", "LoggerFanout", "Plugins", "Registrar", "Route", "Router", "RunInfo", "Session", "SessionConfig",
    "StagedState", "Strict", "force", "get_plugins", "hookimpl", "hookspec", "load", "load_checkpoint", "load_config",
    "save_checkpoint", "veto",
]
