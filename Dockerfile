# CPU image of patchcore, the same artifact as the tarball of scripts/bundle.sh: the build stage
# makes the bundle (Rust, FAISS from source, libtorch from the CPU-only torch 2.13.0 wheel); the
# runtime stage is debian:bookworm-slim holding only the extracted bundle.
#   docker build -t patchcore .
#   docker run --rm patchcore --version
#   docker run --rm -v "$PWD:/work" patchcore predict --index /work/model/index.faiss -i /work/images -o /work/out
# Not built here yet (no Docker daemon on the development machines); hadolint checks it in
# the test suite.
FROM rust:1-bookworm AS build
# Debian stable's packages only get security fixes, so the release pins them well enough.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make pkg-config \
      libopenblas-dev liblapack-dev python3 python3-venv patchelf binutils \
 && rm -rf /var/lib/apt/lists/*
# libtorch 2.13.0 from the CPU-only PyTorch wheel, left in its environment: bundle.sh reads
# the licences of the libraries it takes from the wheel's metadata.
RUN python3 -m venv /opt/py \
 && /opt/py/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
ENV PATCHCORE_PYTHON=/opt/py/bin/python
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY scripts ./scripts
RUN bash scripts/bundle.sh --out /dist \
 && mkdir -p /opt/patchcore \
 && tar -C /opt/patchcore --strip-components=1 -xzf /dist/patchcore-*-linux-x86_64.tar.gz

FROM debian:bookworm-slim
COPY --from=build /opt/patchcore /opt/patchcore
ENTRYPOINT ["/opt/patchcore/bin/patchcore"]
CMD ["--help"]
