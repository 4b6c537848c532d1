# GPU image: NVIDIA's PyTorch container already ships CUDA builds of torch, torchvision and DALI
# matched to its driver stack, so only the remaining requirements are installed on top.
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.10-py3
FROM ${FROM_IMAGE_NAME}

WORKDIR /workspace/convnets
COPY requirements.txt .
RUN grep -v -E "^(torch|torchvision|nvidia-dali)" requirements.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY . .
