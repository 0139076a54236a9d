"""The application layer: what commands orchestrate (demo, bench, sweep, serve).

Nothing in the library imports this package; it may import every layer below it (the PyTorch side,
`exporters/`, `runtimes/`, the torch-free core). Optional dependencies are imported lazily through
:func:`cfvit_deploy.extras.require`.
"""
