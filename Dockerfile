# Build: the same command as in the README. No protoc is needed (protox).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

# Run: a slim image with the binaries only, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin actionsd \
    && mkdir -p /var/lib/actionsd \
    && chown actionsd:actionsd /var/lib/actionsd
COPY --from=build /src/target/release/actionsd /usr/local/bin/actionsd
COPY --from=build /src/target/release/actionsctl /usr/local/bin/actionsctl
USER actionsd
# The default store (no ACTIONSD_DATABASE_URL) is an SQLite file under
# $XDG_DATA_HOME: /var/lib/actionsd/actionsd/actionsd.db, on a volume.
# A container is reached through its own interface, so the image listens on
# 0.0.0.0. actionsd refuses a non-loopback address without TLS and
# authentication, and the image does not decide that for you: give it TLS
# (ACTIONSD_TLS_CERT/ACTIONSD_TLS_KEY or a config file) and authentication,
# or say explicitly that the network is trusted with
# ACTIONSD_DANGEROUSLY_ALLOW_INSECURE_PUBLIC_LISTENER=true (see README,
# Docker, and docs/security.md).
ENV ACTIONSD_LISTEN=0.0.0.0:8091 \
    XDG_DATA_HOME=/var/lib/actionsd
VOLUME /var/lib/actionsd
EXPOSE 8091
# Exec form, so SIGTERM reaches the daemon and starts a graceful shutdown.
ENTRYPOINT ["/usr/local/bin/actionsd"]
CMD ["serve"]
