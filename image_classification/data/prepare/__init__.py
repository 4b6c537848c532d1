"""Preparing datasets, apart from training: ``python -m image_classification.data.prepare`` (:mod:`.cli`)
writes a capped copy of an image tree, shards (:mod:`.convert`) or the packed form (:mod:`.pack`);
``python -m image_classification.data.digits`` (:mod:`.digits`) writes a small dataset to try things on.
"""
