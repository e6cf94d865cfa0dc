"""The shared core below every component: the contract's constants and the configuration.

Nothing here imports a component (gateway, orchestrator, proxy, desktop) or the CLI;
they all import it. The layers are declared with import-linter in pyproject.toml.
"""
