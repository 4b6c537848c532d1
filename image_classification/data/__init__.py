"""Data: where the samples are, how they become batches, and how datasets are prepared.

* :mod:`.contract` -- what a backend is given (``LoaderConfig``) and gives back (``Loader``), and an
  epoch's progress; :mod:`.registry` -- ``--data-backend`` names to backends;
* :mod:`.sources` -- the samples of a split in each storage format (folder, TFRecord, WebDataset,
  packed), the format detected at the package's front; :mod:`.remote` -- files by path or URL;
* :mod:`.loaders` -- the backends (pytorch, DALI, synthetic) and what they share (sampling,
  transforms, device copy);
* :mod:`.prepare` -- the ``prepare`` command (copies, shards, packed) and the digits dataset, apart
  from training.
"""
