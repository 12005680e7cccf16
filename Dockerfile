# syntax=docker/dockerfile:1
#
# chunkmill: ONE image holding the four binaries (fetcher, mapper, saver, broadcaster) in
# /usr/local/bin.
#
#   tag="0.1.0-$(git rev-parse --short=12 HEAD)"       # one tag per commit (deploy/README.md)
#   docker build -t "chunkmill:$tag" \
#     --build-arg CHUNKMILL_GIT_COMMIT="$(git rev-parse --short=12 HEAD)" .
#   docker run --rm "chunkmill:$tag" mapper --help
# (Pushing to your registry, several architectures: deploy/README.md, step 1.)
#
# Why one image and not three: the binaries share one workspace, one Cargo.lock and almost all
# their code (`common`), so they are built by ONE `cargo build` anyway; one image means one build,
# one push, one tag to roll out, and a fetcher, mappers and savers that can never run mismatched
# protocol versions. The binaries add a few MB to each image at most, and a node that runs
# several services pulls the layers once. Kubernetes and compose pick the service with `command`.
#
# The image name below is what deploy/ and compose.yaml use; tests/deploy_cli.rs checks that
# every manifest refers to exactly this name, that the LABEL's tag is the binaries' --version and
# that the manifests never run a re-pushable tag with imagePullPolicy IfNotPresent
# (deploy/components/image sets the build they run).
#
# Both base images are pinned by digest: a rebuild gets the same compiler and the same runtime
# libraries, not whatever the tag points at that day (tests/deploy_cli.rs requires a digest on
# every FROM). To move to newer ones, look the digest up and replace it, e.g.
#   docker buildx imagetools inspect rust:1-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
# (The digests below were taken from public Dockerfiles that pin these tags, not looked up in
# the registries: this repository's machines have no registry access. Check them on the first
# build.)

############################ build ############################
# Debian 12 (bookworm) like the runtime image: same glibc, so the binaries link against it.
FROM rust:1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e AS builder
WORKDIR /src

# Set by the build (`--build-arg`): the commit in the chunkmill_build_info metric. .git is not in
# the build context (.dockerignore), so without it the commit reads `unknown`.
ARG CHUNKMILL_GIT_COMMIT=unknown
ENV CHUNKMILL_GIT_COMMIT=${CHUNKMILL_GIT_COMMIT} \
    CARGO_TERM_COLOR=never

COPY . .

# Dependency caching with BuildKit cache mounts (no cargo-chef): the crates.io index, downloaded
# crates and the whole target/ directory live in caches that outlive this layer. When only our
# own code changed, this step re-runs but finds every dependency already compiled and rebuilds
# just the workspace crates. (A "dummy workspace" layer would also need stub files for every
# member, build script and target, and breaks each time a crate is added; cache mounts don't.)
# The binaries are copied out of the cache mount, which is not part of the image.
RUN --mount=type=cache,id=chunkmill-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=chunkmill-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=chunkmill-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p fetcher -p mapper -p saver -p broadcaster --bins \
 && install -D -m 0755 -t /out/usr/local/bin \
        target/release/fetcher target/release/mapper target/release/saver \
        target/release/broadcaster \
 && install -d -m 0755 -o 65532 -g 65532 /out-dirs/data /out-dirs/out /out-dirs/state

############################ runtime ############################
# distroless/cc: glibc, libgcc, CA certificates (for NATS over TLS and the chat APIs), tzdata, and nothing else: no
# shell, no package manager. The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

LABEL org.opencontainers.image.title="chunkmill" \
      org.opencontainers.image.description="chunkmill pipeline: fetcher, mapper, saver and broadcaster binaries" \
      org.opencontainers.image.source="https://github.com/chunkmill/chunkmill" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      io.chunkmill.image="ghcr.io/chunkmill/chunkmill:0.1.0"

# Binaries owned by root (not writable by the service user).
COPY --from=builder /out/usr/local/bin/ /usr/local/bin/
# Mount points owned by the service user, so that fresh Docker named volumes (compose.yaml)
# start writable by it. In Kubernetes, fsGroup does the same for PersistentVolumes.
COPY --from=builder --chown=65532:65532 /out-dirs/ /

# Numeric, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 65532:65532

# The metrics/health ports (--metrics-addr defaults): fetcher 9101, mapper 9102, saver 9103,
# broadcaster 9104.
EXPOSE 9101 9102 9103 9104

# No ENTRYPOINT: the service is the command (`fetcher`, `mapper`, `saver`, `broadcaster`; all on
# PATH).
CMD ["fetcher", "--help"]
