# etcd-syncer container image. The Helm chart's default image is
# `etcd-syncer:<appVersion>`, so build it as:
#   docker build -t etcd-syncer:0.1.0 .

FROM rust:1-bookworm AS build
# etcd-client's build generates its gRPC code with protoc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY e2e ./e2e
RUN cargo build --release --locked --bin etcd-syncer

# distroless/cc has glibc and libgcc and nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/etcd-syncer /usr/local/bin/etcd-syncer
USER 65532:65532
EXPOSE 9091
ENTRYPOINT ["/usr/local/bin/etcd-syncer"]
CMD ["--help"]
