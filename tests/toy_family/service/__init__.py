"""The toy family's BentoML service folder (service.py + toy_net.py, copied into bentos)."""
