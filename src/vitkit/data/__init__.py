"""Data: image loading, inference preprocessing, labels, datasets and training transforms.

Submodules are imported on use (`from vitkit.data.processor import ImageProcessor`) so that
`import vitkit` stays light.
"""
