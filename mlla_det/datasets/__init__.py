"""Datasets of mlla_det: the generated "shapes" instance-segmentation data (COCO format).

The names are resolved lazily so that `python -m mlla_det.datasets.shapes` does not import the
module twice (runpy warns when a package has already imported the module it is asked to run).
"""
_EXPORTS = ('CLASSES', 'ShapesSettings', 'ensure_dataset', 'generate_dataset', 'render_image')

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from . import shapes
        return getattr(shapes, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
