"""logging_comet plugin: the `comet` logger kind, which sends attnplug's metrics, its config (as
parameters) and sample images to a Comet experiment through `comet_ml` (the `comet` extra).

`comet_ml` is imported only when a comet logger starts its experiment (at its first event), so
`import attnplug` and building a session never import it. README.md has what is logged and the settings.
"""
