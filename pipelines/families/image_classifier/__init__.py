"""Image classification family: an image folder or manifest -> a CNN / resnet18-style network.

``ImageClassifier`` (``family.py``) is what ``pipelines/families/__init__.py:FAMILIES`` names;
``data.py`` reads sources, ``images.py`` checks and decodes files, ``model.py`` / ``train.py`` /
``export.py`` / ``tracking.py`` build, train, compress and log the model.
"""

from pipelines.families.image_classifier.family import ImageClassifier
from pipelines.families.image_classifier.init_template import init_settings

__all__ = ["ImageClassifier", "init_settings"]
