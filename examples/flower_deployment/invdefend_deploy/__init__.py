"""invdefend on Flower's deployment engine: a ServerApp and a ClientApp for ``flwr run`` (see pyproject.toml)."""
