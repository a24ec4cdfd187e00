"""`tokenlean serve --engine ray`: the app create_app builds, unchanged, in Ray Serve replicas
behind Ray's HTTP proxy. Each replica is one process (a Ray actor) that loads the models once and
runs its own micro-batcher and admission, as the single-process server does; Ray's proxy spreads
requests over the replicas, queues at most `max_queued_requests` per proxy (then 503 with
Retry-After) and restarts replicas that die.

- A replica is ready (routed to) once its models are loaded and warmed up: Ray runs the app's
  lifespan when the replica starts, which starts loading in the background, and the replica's
  first health check, part of its start-up, waits for the load to end (and fails if it failed).
- Every response a replica sends names it in `x-tokenlean-replica` (Ray's replica id, the
  `replica` label of its metrics).
- Every metric update is recorded on Ray's metrics API as well (ray_metrics.py): Ray exports every
  replica's samples, labelled by replica, on each node's metrics export port.
- `build_app` is the Serve application builder, for `tokenlean serve --engine ray` and for the
  Serve config `tokenlean ray-config` writes (`serve run` / `serve deploy`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading

from ray import serve

from app.engines.ray_config import DEPLOYMENT, absolute_paths, deployment_options, http_options
from app.engines.ray_metrics import mirror_to_ray
from app.engines.ray_proxy import CALLBACK
from app.engines.replica import install as install_replica_header
from app.settings import Settings

log = logging.getLogger("tokenlean")
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
HEALTH_POLL_S = 0.05


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class TokenLean:
    """One replica: the tokenlean app, built in the replica's own process from the settings the
    command resolved."""

    def __init__(self, settings: dict):
        self._settings = Settings(**settings)
        self._app = None
        self._frozen = False

    def __serve_build_asgi_app__(self):
        from app.logs import configure
        from app.main import create_app
        from app.server import SWITCH_INTERVAL_S

        configure(self._settings.log_format, self._settings.log_level)
        # as app/server.py does: the event loop waits for the model thread's GIL 1 ms at most
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        app = create_app(self._settings)
        mirror_to_ray(app.state.metrics)
        replica = serve.get_replica_context().replica_tag
        install_replica_header(app, replica)
        self._app = app
        import torch  # create_app loaded it

        log.info("replica %s: pid %d, %d torch threads", replica, os.getpid(), torch.get_num_threads())
        return app

    async def check_health(self) -> None:
        """The first call (part of the replica's start) returns once the models are loaded and
        warmed up; later ones at once. Raises when loading failed: Ray replaces the replica."""
        state = self._app.state
        while not (state.ready or state.load_failed or state.drain.started):
            await asyncio.sleep(HEALTH_POLL_S)
        if state.load_failed:
            raise RuntimeError("loading the models failed; see the replica's log")
        if state.ready and not self._frozen:
            # as app/server.py does once ready: the models leave the garbage collector's sight
            gc.collect()
            gc.freeze()
            self._frozen = True


def build_app(args: dict | None = None):
    """The Serve application (builder of a Serve config's `import_path`). `args`: tokenlean
    settings nested as Settings' fields; TOKENLEAN_* variables where this runs fill the rest."""
    return application(Settings(**(args or {})))


def application(settings: Settings):
    """The Serve application of settings already resolved (the command's)."""
    settings = absolute_paths(settings)
    return TokenLean.options(**deployment_options(settings)).bind(settings.model_dump(mode="json"))


class Stopped(Exception):
    """A signal came while the replicas were starting."""


def connect(settings: Settings) -> bool:
    """Join the cluster RAY_ADDRESS names, or start a local Ray instance (True)."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, namespace="serve")
        log.info("joined the Ray cluster at %s", address)
        return False
    # The proxy of the instance started here answers its own errors in JSON (ray_proxy.py).
    os.environ.setdefault(PROXY_CALLBACK_ENV, CALLBACK)
    context = ray.init(
        namespace="serve",
        include_dashboard=settings.ray.dashboard,
        _metrics_export_port=settings.ray.metrics_export_port or None,
    )
    info = context.address_info
    log.info(
        "started a local Ray instance at %s; every replica's metrics: http://127.0.0.1:%s/metrics",
        info["gcs_address"],
        info["metrics_export_port"],
        extra={"fields": {"ray_address": info["gcs_address"], "metrics_port": info["metrics_export_port"]}},
    )
    return True


def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then delete the application (its replicas drain as the
    single-process server does) and stop the Ray instance if this command started it."""
    local = connect(settings)
    stop, starting = threading.Event(), [True]

    def on_signal(*_) -> None:
        stop.set()
        if starting[0]:  # interrupts serve.run, which waits for every replica
            raise Stopped

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    r = settings.ray
    try:
        serve.start(http_options=http_options(settings))
        replicas = f"{r.replicas} replicas"
        if r.autoscaling:
            replicas = f"{r.min_replicas}-{r.max_replicas} replicas (autoscaling)"
        log.info("starting %s of %s", replicas, r.app_name)
        serve.run(application(settings), name=r.app_name, route_prefix="/", blocking=False)
        starting[0] = False
        url = f"http://{settings.host}:{settings.port}"
        log.info("serving on %s through Ray Serve: %s ready", url, replicas)
        while not stop.wait(1.0):
            pass
        log.info("stopping: deleting the application %s", r.app_name)
        serve.delete(r.app_name)
    except Stopped:
        log.info("stopped while starting: deleting the application %s", r.app_name)
        starting[0] = False
        serve.delete(r.app_name)
    except RuntimeError as exc:  # e.g. the replicas could not start: Ray said why
        sys.exit(f"tokenlean serve --engine ray: {exc}")
    finally:
        if local:
            import ray

            serve.shutdown()
            ray.shutdown()
