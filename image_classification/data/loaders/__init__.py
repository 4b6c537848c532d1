"""The data backends (``--data-backend``): each turns a split's samples into device batches.

Every backend fulfils :mod:`image_classification.data.contract`, reads its samples through
:mod:`image_classification.data.sources` and splits them across processes and epochs with
:mod:`.sampling`; :mod:`image_classification.data.registry` maps the names to them.
"""
