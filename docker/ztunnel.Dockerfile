# syntax=docker/dockerfile:1
# The node image: ztunnel, the weft-cni plugin its DaemonSet installs on each node, and `nft`,
# which ztunnel runs to install capture rules inside pods' network namespaces. From the
# repository's root:
#
#   docker build -f docker/ztunnel.Dockerfile -t weft-ztunnel:dev .
#
# weft-cni is the binary of the workspace's `cni` crate, built beside ztunnel.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ztunnel -p cni \
    && install -D -m 0755 target/release/ztunnel /out/ztunnel \
    && install -D -m 0755 target/release/weft-cni /out/weft-cni

# A shell-less base would do for ztunnel itself, but nft comes from Debian with its libraries
# (libnftables, libmnl, libnftnl, libjansson), so the runtime is Debian's slim image.
FROM debian:bookworm-slim
# Not pinned (DL3008): Debian's stable release takes only security and bug fixes, and a pinned
# version stops installing once one of them replaces it.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ztunnel /out/weft-cni /usr/local/bin/
# Root, deliberately. ztunnel enters pods' network namespaces (SYS_ADMIN), opens other users'
# /proc/<pid>/ns/net (SYS_PTRACE) and programs nftables there (NET_ADMIN, inherited by the
# `nft` it runs). Kubernetes gives a non-root container no ambient capabilities, so only
# root keeps them across exec. The DaemonSet drops every other capability and keeps the
# root filesystem read-only (manifests/ztunnel.yaml).
# hadolint ignore=DL3002
USER 0:0
# 15020 metrics, 15021 readiness (15001/15006/15008 listen inside pods, not here).
EXPOSE 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]
