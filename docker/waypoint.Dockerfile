# syntax=docker/dockerfile:1
# The waypoint image: the L7 proxy (ARCHITECTURE §2, §4.4; `waypoint/`, binary
# `weft-waypoint`). From the repository's root:
#
#   docker build -f docker/waypoint.Dockerfile -t weft-waypoint:dev .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p waypoint \
    && install -D -m 0755 target/release/weft-waypoint /out/weft-waypoint

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/weft-waypoint /usr/local/bin/weft-waypoint
# A waypoint is an ordinary pod: it listens on ports above 1024 in its own network namespace
# and needs no capability.
USER 65532:65532
# 15008 HBONE, 15020 metrics, 15021 readiness.
EXPOSE 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/weft-waypoint"]
