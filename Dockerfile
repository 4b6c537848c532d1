# GPU image: NVIDIA's PyTorch container ships CUDA builds of torch and torchvision matched to its
# driver stack, so those are kept. Everything else comes from requirements.txt, NVIDIA DALI
# included: the DALI of containers older than DALI 1.44 (24.10 is) rejects `exec_dynamic`, which the
# dali-cpu and dali-gpu pipelines use, so the pinned nvidia-dali-cuda120 replaces it (checked below).
# GPU smoke check inside the image: docker run --gpus all --rm IMAGE bash benchmarks/gpu_smoke.sh
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.10-py3
FROM ${FROM_IMAGE_NAME}

WORKDIR /workspace/convnets
COPY requirements.txt .
RUN grep -v -E "^(torch|torchvision)==" requirements.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY . .
RUN python -c "from image_classification.data.loaders.dali import import_dali; import_dali()"
