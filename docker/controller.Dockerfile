# syntax=docker/dockerfile:1
# The controller image: weft-controller on a distroless base (glibc and the C runtime, no
# shell, no package manager), as an unprivileged user. From the repository's root:
#
#   docker build -f docker/controller.Dockerfile -t weft-controller:dev .

# The workspace needs Rust 1.89 or later (Cargo.toml's rust-version).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest, even to build one package.
COPY . .
# Registry and target directory in BuildKit caches, so a rebuild compiles only what changed;
# the binary is copied out of the cache, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p controller \
    && install -D -m 0755 target/release/weft-controller /out/weft-controller

# Debian 12, as the builder: the binary links the same glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/weft-controller /usr/local/bin/weft-controller
# distroless's `nonroot` user. The controller binds only ports above 1024 and needs no
# capability; its Deployment runs it read-only as this user.
USER 65532:65532
# 15012 watch and certificate APIs (TLS), 15020 metrics, 15021 readiness.
EXPOSE 15012 15020 15021
ENTRYPOINT ["/usr/local/bin/weft-controller"]
