"""BentoML service of the text embedder (service.py) and its runtimes (maas_runtime.py)."""
