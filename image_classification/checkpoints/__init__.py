"""Checkpoints: the files a training run writes and every reader of them.

* :mod:`.files`: bytes on disk, and nothing of the project but its errors: the one safe ``.pth``
  reader (``weights_only=True``, one-line errors) and atomic writes (written once, hard-linked).
* :mod:`.contents`: what a checkpoint holds, the keys' one owner: :func:`~.contents.capture`
  writes them, :class:`~.contents.SavedRun` reads them back with named accessors (older formats
  migrated there), :func:`~.contents.read_weights` picks the weights out of any weights file.
* :mod:`.writer`: saving during training: the run's files and their retention, and the
  :class:`~.writer.CheckpointWriter` the training loop calls.

Import the submodule you need; this package imports none of them, so that the leaf stays a leaf.
"""
