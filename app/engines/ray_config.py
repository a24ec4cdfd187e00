"""What Ray Serve is told: the deployment's options from the `ray` settings group, and the Serve
config file (`serve run` / `serve deploy` YAML) that `tokenlean ray-config` writes. Imports
neither Ray nor torch."""

from __future__ import annotations

from pathlib import Path

from app.settings import CHECKPOINTS, ModelSettings, Settings

DEPLOYMENT = "TokenLean"
BUILDER = "app.engines.ray_serve:build_app"
# What Ray's hard stop adds to the app's own drain (shutdown_timeout_s): time to answer the
# requests the drain gave up on.
GRACE_S = 5
# Settings that are Ray's business in a Serve config (http_options, deployments), or secrets.
NOT_ARGS = {"host", "port", "engine", "ray", "api_key"}


def deployment_options(settings: Settings) -> dict:
    """`Deployment.options(...)` of the replicas: replica count or autoscaling, admission in
    the proxy and the replica, resources, shutdown."""
    r = settings.ray
    options: dict = {
        "max_ongoing_requests": r.max_ongoing_requests,
        "max_queued_requests": r.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": r.retry_after_s},
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s + GRACE_S,
    }
    if r.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": r.min_replicas,
            "max_replicas": r.max_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = r.replicas
    return options


def http_options(settings: Settings) -> dict:
    """Where Ray's proxies listen (every node's), and their keep-alive."""
    return {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": settings.keep_alive_s}


def absolute_paths(settings: Settings) -> Settings:
    """Local checkpoint and export folders as absolute paths: a replica's working directory is
    not the command's. Hub ids (no such local folder) stay as they are."""
    models = {}
    for task, cfg in settings.models.items():
        update = {}
        for field in ("checkpoint", "export_dir"):
            value = getattr(cfg, field)
            if value and Path(value).exists():
                update[field] = str(Path(value).resolve())
        models[task] = cfg.model_copy(update=update)
    return settings.model_copy(update={"models": models})


def builder_args(settings: Settings) -> dict:
    """The settings that differ from the defaults, as the builder's `args` (nested like
    Settings' fields); a task's demo checkpoint is left out, so the file holds no path of this
    machine. The API key is never written: give it to the replicas as TOKENLEAN_API_KEY."""
    from app.tasks.base import tasks

    args = settings.model_dump(mode="json", exclude=NOT_ARGS | {"models"}, exclude_defaults=True)
    models = {}
    for task, cfg in settings.models.items():
        fields = cfg.model_dump(mode="json", exclude_defaults=True)
        if fields.get("checkpoint") == str(CHECKPOINTS / tasks()[task].demo_checkpoint):
            del fields["checkpoint"]
        if fields != ModelSettings().model_dump(mode="json", exclude_defaults=True):
            models[task] = fields
    if models:
        args["models"] = models
    return args


def serve_config(settings: Settings) -> dict:
    """A Serve config (ray.serve.schema.ServeDeploySchema) serving these settings."""
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(settings),
        "applications": [
            {
                "name": settings.ray.app_name,
                "route_prefix": "/",
                "import_path": BUILDER,
                "args": builder_args(settings),
                "deployments": [{"name": DEPLOYMENT, **deployment_options(settings)}],
            }
        ],
    }


HEADER = """\
# Ray Serve config for tokenlean, written by `tokenlean ray-config{flags}`.
#   on a cluster: serve deploy THIS_FILE (tokenlean installed on every node; docs/deploying.md)
#   on this host: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.engines.ray_proxy:middlewares \\
#                 serve run THIS_FILE
# `args`: tokenlean settings, nested as the TOKENLEAN_* variables nest them; `deployments`: Ray's.
"""


def serve_config_yaml(settings: Settings, flags: list[str] | None = None) -> str:
    import yaml

    shown = (" " + " ".join(flags)) if flags else ""
    body = yaml.safe_dump(serve_config(settings), sort_keys=False, default_flow_style=False)
    return HEADER.format(flags=shown) + body
