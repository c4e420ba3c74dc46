"""The configs, shipped as package data: `tiny.yaml` is the embedded default, which `infra.config` finds through
`importlib.resources`, so an installed package reads the same file as a checkout."""
