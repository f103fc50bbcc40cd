"""controller plugin: decides which layer may be approximated at which step, judged on samples.

- quality terms (`terms.py`, `lpips_term.py`) score a candidate sample against the exact sample of the
  same prompt and noise; third-party terms register through `attnplug_register_quality_terms`;
- calibration (`calibrate.py`) measures the sample-level effect of serving each (layer, σ band) cell and
  searches a serving plan (`plan.py`) that keeps the chosen terms within their budget;
- the plan gate (`gate.py`) serves only the plan's cells; the plan travels inside the checkpoint and is
  used by default when serving it.
"""
