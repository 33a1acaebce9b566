# syntax=docker/dockerfile:1
# testrunner-operator: one image, one binary. The same binary runs the operator
# (`testrunner-operator run`) and, copied into wrapped-mode worker pods by their init
# container (`testrunner-operator install-worker`), the worker wrapper.
#
#   docker build -t registry.example/ci/testrunner-operator:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... --push .   # both architectures
#
# The binary is statically linked (.cargo/config.toml), so the worker wrapper it becomes
# in worker pods needs nothing from the test image: no libc, no NSS, no CA store. It is
# built without the default feature `simulate`: the image has no simulated cluster
# (`testrunner-operator simulate`, the workspace crate sim/), only the operator.
#
# Build stage: the Rust toolchain on Debian 12; the cache mounts keep the crate registry
# and the target directory between builds (BuildKit).
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY benches ./benches
# A workspace member: Cargo reads its manifest even when the build leaves it out.
COPY sim ./sim
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin testrunner-operator \
 && install -D -m 0755 target/release/testrunner-operator /out/testrunner-operator \
 && if ldd /out/testrunner-operator >/dev/null 2>&1; then echo "not a static binary" >&2; exit 1; fi

# Runtime stage: distroless/static (CA certificates and /etc/passwd only), no shell, no
# package manager, running as the unprivileged "nonroot" user (65532), as the chart expects.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="testrunner-operator" \
      org.opencontainers.image.description="Kubernetes operator that runs CI test workers off a RabbitMQ ticket queue" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/testrunner-operator /usr/local/bin/testrunner-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/testrunner-operator"]
CMD ["run"]
