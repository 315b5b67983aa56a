# The image of any Rempart service, built from the repository root. `make images`
# (tools/build_images.py) builds the five with the arguments the chart's values give
# (deploy/helm/rempart/values.yaml, components.*: imageName, module, ports, opsPort), e.g.
#   docker build --build-arg SERVICE=smtp-edge --build-arg MODULE=rempart.smtp_edge \
#     --build-arg PORTS="2525 2587 2465 9101" -t ghcr.io/rempart/smtp-edge:0.1.0 .
# SERVICE  the directory of services/ the image installs, beside libs/common;
# MODULE   what the entrypoint runs: /opt/venv/bin/python -m MODULE;
# PORTS    the ports it EXPOSEs: the service's listeners and its ops port.
# The smtp-edge image also runs the outbound relay (the chart's relay Deployment, whose command:
# names the module, as every component's does; or `docker run -e REMPART_MODULE=...`):
#   /opt/venv/bin/python -m rempart.smtp_edge.relay   (ops port 9106)
# The chart runs every image as uid 10001 on a read-only root filesystem with /tmp as an emptyDir.

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY constraints.txt ./
COPY libs/common ./libs/common
# Declared after the layers all services share, so that those stay cached from one to the next.
ARG SERVICE
ARG MODULE
ARG PORTS
COPY services/${SERVICE} ./services/${SERVICE}
# Regular, not editable, installs: the final stage copies /opt/venv alone. pip compiles the .pyc
# files here because the root filesystem is read-only at run time. A missing argument or a MODULE
# the venv lacks fails the build, not the pod.
RUN : "${SERVICE:?--build-arg SERVICE=<a directory of services/>}" \
      "${MODULE:?--build-arg MODULE=rempart.<module>}" "${PORTS:?--build-arg PORTS=<ports, space-separated>}" \
 && /opt/venv/bin/pip install -c constraints.txt ./libs/common "./services/${SERVICE}" \
 && /opt/venv/bin/python -c 'import importlib.util as u, sys; u.find_spec(sys.argv[1]) or sys.exit("no module " + sys.argv[1])' "$MODULE"

# No compiler, no pip cache, no sources: the interpreter and the venv. The same base image as the
# builder, so the venv's python symlink still points at /usr/local/bin/python3.11.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 rempart \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rempart
COPY --from=builder /opt/venv /opt/venv
ARG MODULE
ARG PORTS
# Read by the entrypoint only (no setting of the code has this name).
ENV REMPART_MODULE=${MODULE}
USER 10001:10001
EXPOSE ${PORTS}
# Exec form: sh only expands $REMPART_MODULE and execs python, which becomes PID 1 and receives
# SIGTERM itself. Arguments of `docker run IMAGE ...` follow the module.
ENTRYPOINT ["/bin/sh", "-c", "exec /opt/venv/bin/python -m \"$REMPART_MODULE\" \"$@\"", "rempart"]
