"""Plugin discovery: entry points, failing imports, blocking, duplicates, one registry per process."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from attnplug.core import Plugins, Session, hookimpl
from attnplug.core.backend import Backend

ROOT = Path(__file__).resolve().parents[1]


class FakeEntryPoint:
    def __init__(self, name, loader):
        self.name, self.group, self._loader = name, "attnplug", loader

    def load(self):
        return self._loader()


class FakeDist:
    def __init__(self, name, eps, version="9.9"):
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = eps


def _module_with_backend(backend_name):
    mod = types.ModuleType(f"fake_{backend_name}")

    class B(Backend):
        name = backend_name

        def forward(self, q, k, v, call, mask=None):
            return v

    @hookimpl
    def attnplug_register_backends(registrar):
        registrar.add(backend_name, lambda s, session: B())

    mod.attnplug_register_backends = attnplug_register_backends
    return mod


def _boom():
    raise ModuleNotFoundError("No module named 'comet_ml'", name="comet_ml")


def test_entry_point_discovery_and_failed_import(monkeypatch):
    dists = [FakeDist("acme-attn", [FakeEntryPoint("acme", lambda: _module_with_backend("acme"))]),
             FakeDist("broken-pack", [FakeEntryPoint("broken", _boom)])]
    monkeypatch.setattr(md, "distributions", lambda: iter(dists))
    pm = Plugins(builtins={"core": "attnplug.core.builtin"})
    infos = {i.name: i for i in pm.describe()}
    assert infos["acme"].origin == "entry point (acme-attn)" and infos["acme"].version == "9.9"
    assert infos["acme"].registers["backend"] == ["acme"]
    assert infos["broken"].origin == "failed"
    assert "No module named 'comet_ml'" in infos["broken"].error and "pip install attnplug[comet]" in infos["broken"].error
    s = Session({"backend": "acme", "exact": "sdpa", "loggers": []}, pm)
    assert s.backends.entries["acme"].plugin == "acme"


def test_blocking_by_env_and_config(monkeypatch):
    dists = [FakeDist("acme-attn", [FakeEntryPoint("acme", lambda: _module_with_backend("acme"))])]
    monkeypatch.setattr(md, "distributions", lambda: iter(dists))
    monkeypatch.setenv("ATTNPLUG_DISABLE_PLUGINS", "acme")
    pm = Plugins(builtins={"core": "attnplug.core.builtin"})
    assert pm.infos["acme"].origin == "blocked" and pm.pm.get_plugin("acme") is None
    monkeypatch.delenv("ATTNPLUG_DISABLE_PLUGINS")
    pm = Plugins(builtins={"core": "attnplug.core.builtin"})
    from attnplug.core.config import ConfigError
    with pytest.raises(ConfigError, match="unknown backend 'acme'"):
        Session({"backend": "acme", "disable_plugins": ["acme"], "loggers": []}, pm)
    with pytest.raises(ValueError, match="essential"):
        Plugins(disabled=["core"], builtins={"core": "attnplug.core.builtin"})


def test_duplicate_backend_names_raise_naming_both(core_plugins):
    core_plugins.register(_module_with_backend("sdpa"), name="copycat")
    with pytest.raises(ValueError, match=r"backend 'sdpa' registered twice: by plugin 'core' and by plugin 'copycat'"):
        core_plugins.collect("backend")


def test_builtin_feature_packs_are_listed():
    pm = Plugins(load_entry_points=False)
    names = {i.name: i.origin for i in pm.describe()}
    assert names["core"] == "built-in" and names["ttr"] == "built-in" and names["landmark"] == "built-in"


def test_import_does_not_pull_optional_dependencies():
    code = ("import sys, attnplug, attnplug.core; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('diffusers', 'comet_ml', 'lpips', 'triton', 'comfy', 'comfy_api', 'transformers')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_registry_when_imported_under_another_name(tmp_path):
    """ComfyUI imports the folder as a module named after it: that must alias the canonical package."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("ComfyUI_attnplug", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ComfyUI_attnplug"] = mod
        spec.loader.exec_module(mod)
        import attnplug
        from attnplug.core.plugins import get_plugins
        assert sys.modules["ComfyUI_attnplug"] is attnplug
        assert mod.get_plugins is get_plugins and mod.get_plugins() is get_plugins()
        assert callable(mod.comfy_entrypoint)
        print("one registry")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "one registry" in out.stdout


def test_example_backend_package_registers_through_entry_point(monkeypatch):
    sys.path.insert(0, str(ROOT / "examples" / "example_backend"))
    try:
        import attnplug_example_backend as example
    finally:
        sys.path.pop(0)
    dists = [FakeDist("attnplug-example-backend", [FakeEntryPoint("example_backend", lambda: example)])]
    monkeypatch.setattr(md, "distributions", lambda: iter(dists))
    pm = Plugins(builtins={"core": "attnplug.core.builtin"})
    import torch
    from attnplug.core import AttentionCall
    from attnplug.core.exact import sdpa
    s = Session({"backend": "chunked_sdpa", "exact": "sdpa", "loggers": [],
                 "plugins": {"example_backend": {"query_chunk": 3}}}, pm)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    torch.testing.assert_close(s.attention(q, k, v, AttentionCall("single:0")), sdpa(q, k, v))
