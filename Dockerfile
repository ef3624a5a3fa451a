# syntax=docker/dockerfile:1
# Multi-stage build: the gateway built in the Rust image, run from a slim Debian as a
# non-root user. docker build -t switchboard . ; export SWITCHBOARD_TOKEN="$(openssl rand -hex 32)" ;
# docker run -e SWITCHBOARD_TOKEN -p 8080:8080 -p 127.0.0.1:9090:9090 switchboard
# (the default config reads its management token from SWITCHBOARD_TOKEN and refuses to start
# without it; the management port is published on loopback only)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p switchboard \
 && cp target/release/switchboard /usr/local/bin/switchboard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/switchboard switchboard \
 && mkdir -p /var/lib/switchboard /etc/switchboard \
 && chown switchboard:switchboard /var/lib/switchboard
COPY --from=build /usr/local/bin/switchboard /usr/local/bin/switchboard
COPY deploy/docker/switchboard.toml /etc/switchboard/switchboard.toml
USER switchboard
VOLUME /var/lib/switchboard
EXPOSE 8080 9090
# The binary raises its soft open-files limit to the hard one; raise the hard one with
# `docker run --ulimit nofile=1048576:1048576` (compose: ulimits).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD curl -fsS http://127.0.0.1:9090/health || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchboard"]
CMD ["serve", "--config", "/etc/switchboard/switchboard.toml"]
