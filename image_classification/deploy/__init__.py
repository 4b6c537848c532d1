"""Using a trained model outside the training loop, one job a module:

* ``labels``: class names (ImageNet list, ``--labels`` files, which names a model gets)
* ``loading``: the model flags, reading a weights file or checkpoint once, building the model
* ``exporting``: writing ONNX / TorchScript with a dynamic batch axis
* ``metadata``: the preprocessing and class names an ONNX file records about itself
* ``runners``: running an export (ONNX Runtime, TorchScript); ``OnnxModel`` for ``--onnx``
* ``parity``: the export against the eager model on the same images
* ``ptq``: post-training INT8 for ONNX Runtime; ``triton``: a Triton model repository entry
* ``fast_cpu``: BatchNorm folding and the fast CPU inference path
* ``classifying`` and ``export_and_check``: the steps of ``classify.py`` and ``model2onnx.py``
"""
