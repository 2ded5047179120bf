# The portless image, with no registry: nothing is pulled. The root
# filesystem is assembled from this machine's build output first:
#
#   deploy/image-rootfs.sh        # cargo build --release, then stage target/image/rootfs
#   docker build -t portless .
#
# How to run it (host network, capabilities, Docker socket, config): the
# README's "docker run" section.
FROM scratch
COPY target/image/rootfs/ /
ENV PATH=/usr/local/bin:/usr/sbin
# The admin API answers (PORTLESS_ADMIN_LISTEN is read by `status` too).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s CMD ["portless", "status", "--json"]
ENTRYPOINT ["portless"]
CMD ["run"]
LABEL org.opencontainers.image.title="portless" \
      org.opencontainers.image.description="Docker sidecar: per-network DNS, Host-header ingress and cross-host container networking" \
      org.opencontainers.image.licenses="Apache-2.0"
