# CPU image of patchcore: build stage (Rust, FAISS from source, libtorch from the CPU-only
# torch 2.13.0 wheel), then a slim runtime stage with the binary and libtorch's libraries.
#   docker build -t patchcore .
#   docker run --rm patchcore            # prints --help
#   docker run --rm patchcore --version  # patchcore 0.1.0 (libtorch 2.13.0+cpu, FAISS 1.12.0)
FROM rust:1-bookworm AS build
# Debian stable's packages only get security fixes, so the release pins them well enough.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make pkg-config \
      libopenblas-dev liblapack-dev python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# libtorch 2.13.0 from the CPU-only PyTorch wheel, moved to /opt/libtorch.
RUN python3 -m venv /opt/py \
 && /opt/py/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && mv "$(/opt/py/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" /opt/libtorch \
 && rm -rf /opt/py
ENV LIBTORCH=/opt/libtorch
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/patchcore

FROM debian:bookworm-slim
# Unpinned for the same reason as above. libgomp1: in case the torch wheel's lib/ has no
# libgomp.so.1 of its own (build.rs then links the system's).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas0 liblapack3 libgomp1 libstdc++6 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The binary's rpath points at /opt/libtorch/lib, so keep that path.
COPY --from=build /opt/libtorch/lib /opt/libtorch/lib
COPY --from=build /src/target/release/patchcore /usr/local/bin/patchcore
ENTRYPOINT ["patchcore"]
CMD ["--help"]
