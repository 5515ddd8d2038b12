"""MaaS pipelines: the config, the CLI and the steps (tune/train) in order."""
