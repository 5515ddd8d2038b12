"""The BentoML service packaged into each bento (``service.py``, copied with a
``bento_config.json`` by :func:`bentos.build_bento`). Importing this package is cheap; importing
``service`` pulls in bentoml and torch."""
