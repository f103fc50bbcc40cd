"""The console logger: short default lines, every metric when verbose, progress bars left intact."""
from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from attnplug.core import Plugins, Session
from attnplug.core.loggers import ConsoleLogger, ConsoleSettings

_spec = importlib.util.spec_from_file_location("distill_fakes_console", Path(__file__).with_name("test_distill_fakes.py"))
fk = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(fk)  # type: ignore[union-attr]

QUANTILES = ("min", "p25", "p50", "p75", "max")


def _snapshot() -> dict:
    """A distiller snapshot as the ttr distiller logs it: counters plus five quantiles of 14 metrics."""
    snap = {"reason": "updates", "updates": 120, "layers_tracked": 38, "ready_layers": 5, "ready_score": 4.6,
            "disabled_layers": 0, "replay_mb": 812.25, "replay_samples": 300, "oom_events": 0}
    for i, key in enumerate(("loss", "cos_dist", "ema_cos", "ema_loss", "nmse", "cos_mean", "cos_p5", "rel_l2_p95",
                             "rel_l2_p99", "attn_kl", "attn_topk", "alpha_mean", "logvar_huber", "logvar_cos")):
        for j, q in enumerate(QUANTILES):
            snap[f"{key}/{q}"] = 0.0123456 * (i + 1) * (j + 1)
    return snap


def test_default_line_is_short_and_names_the_key_figures():
    out = io.StringIO()
    ConsoleLogger(ConsoleSettings(), stream=out).log_metrics(_snapshot(), 120, "distill")
    line = out.getvalue().rstrip("\n")
    assert "\n" not in line and len(line) <= 160, line
    assert line.startswith("[attnplug distill @120] ")
    for figure in ("updates=120", "ready_layers=5", "layers_tracked=38", "loss/p50=0.03704", "ema_cos/max=0.1852",
                   "replay_mb=812.2"):
        assert figure in line
    assert "rel_l2_p99" not in line and "/p25" not in line


def test_verbose_prints_every_metric():
    snap = _snapshot()
    out = io.StringIO()
    ConsoleLogger(ConsoleSettings(verbose=True), stream=out).log_metrics(snap, 120, "distill")
    line = out.getvalue()
    assert len(line) > 1000
    assert all(f"{k}=" in line for k in snap)


def test_fields_choose_a_scopes_figures_and_unknown_scopes_show_a_few_plain_ones():
    out = io.StringIO()
    logger = ConsoleLogger(ConsoleSettings(scopes=["*"], fields={"distill": ["updates", "nmse/p50"]}), stream=out)
    logger.log_metrics(_snapshot(), 7, "distill")
    metrics = {f"m{i}": float(i) for i in range(10)} | {"reward/p50": 1.0}
    logger.log_metrics(metrics, 3, "controller")
    first, second = out.getvalue().splitlines()
    assert first == "[attnplug distill @7] updates=120 nmse/p50=0.1852"
    assert second == "[attnplug controller @3] m0=0 m1=1 m2=2 m3=3 m4=4 m5=5"  # max_fields = 6, no quantiles


def test_scopes_and_every_select_events():
    out = io.StringIO()
    logger = ConsoleLogger(ConsoleSettings(scopes=["distill/*"], every=2), stream=out)
    for step in range(4):
        logger.log_metrics({"layer": "single:0", "loss": 0.5}, step, "distill/layer")
        logger.log_metrics({"calls": 3}, step, "session")  # not selected
    lines = out.getvalue().splitlines()
    assert lines == ["[attnplug distill/layer @0] layer=single:0 loss=0.5", "[attnplug distill/layer @2] layer=single:0 loss=0.5"]


def test_lines_are_written_around_a_progress_bar_not_into_it():
    """With a tqdm bar on the same stream the line gets a line of its own and the bar is redrawn after it
    (a plain print would append the line to the bar's text)."""
    out = io.StringIO()
    bar = tqdm(total=10, file=out, desc="distilling", ascii=True, mininterval=0, miniters=1)
    bar.update(3)
    ConsoleLogger(ConsoleSettings(), stream=out).log_metrics({"calls": 12, "approximate_share": 0.5}, 0, "session")
    bar.update(1)
    bar.close()
    segments = re.split(r"[\r\n]", out.getvalue())
    line = "[attnplug session @0] calls=12 approximate_share=0.5"
    assert line in segments  # whole, on its own
    after = segments[segments.index(line) + 1:]
    assert any(s.startswith("distilling:") and "4/10" in s for s in after)  # the bar comes back below it


@pytest.fixture
def distill_session():
    plugins = Plugins(load_entry_points=False)
    if "ttr" not in plugins.collect("distiller").entries:
        pytest.skip("needs the ttr distiller (plugins/ttr)")

    def make(loggers):
        return Session({"backend": "ttr", "exact": "sdpa", "training": True, "distiller": "ttr", "loggers": loggers,
                        "plugins": {"ttr": {"feature_dim": 16, "depth": 1, "key_chunk": 32, "query_chunk": 32},
                                    "distill": {"query_cap": 32, "log_every": 4, "layer_log_every": 2,
                                                "min_swap_layers": 2}}}, plugins)

    return make


@pytest.mark.usefixtures("one_thread")
def test_a_distillation_prints_short_lines_by_default(distill_session, capsys):
    s = distill_session([{"kind": "console", "scopes": ["*"]}])
    fk.run_sampling(s, runs=2, steps=3, layers=["single:0", "single:1"], gen=torch.Generator().manual_seed(0), n=48)
    s.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[attnplug")]
    scopes = {ln.split()[1] for ln in lines}
    assert {"distill", "distill/layer", "distill/readiness", "session", "session/layer"} <= scopes
    assert max(len(ln) for ln in lines) <= 160, max(lines, key=len)
    session_lines = [ln for ln in lines if ln.startswith("[attnplug session @")]
    assert session_lines and all("calls=" in ln and "fallbacks=0" in ln for ln in session_lines)
