"""The data side of the application: datasets whose samples carry stable int64 ids
(:mod:`~kmem.datasets.splits`, read from idx files by :mod:`~kmem.datasets.idx`), the
frozen key encoder (:mod:`~kmem.datasets.encoder`) and its features of a split, cached
on disk (:mod:`~kmem.datasets.features`).

Nothing here is imported by the library core (the memory, the ops, the layer); the
top-level names :func:`kmem.load_dataset`, :func:`kmem.encode`, :class:`kmem.KeyEncoder`
... reach these modules on first use.
"""
