"""A replica's metrics, recorded on Ray's metrics API as well: Ray's metrics agent on each node
exports every replica's samples on one Prometheus endpoint (the node's metrics export port), with
the `replica`, `deployment` and `application` labels Ray Serve adds, under Ray's `ray_` prefix
(`ray_tokenlean_requests_total`, ...). The replica's own registry, which its /metrics shows, keeps
every sample as before.

Ray's agent drops a gauge sample that was not recorded again within two report intervals (so
that a dead worker's gauges go): gauges set once (model load time) or rarely (queue depth at
rest) would vanish from the scrape, so their last values are recorded again every second."""

from __future__ import annotations

import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from app.metrics import Metrics

REFRESH_S = 1.0


class MirroredChild:
    """One labelled child of a metric and the tags of its Ray twin."""

    __slots__ = ("_local", "_parent", "_remote", "_tags")

    def __init__(self, local, parent: Mirrored, tags: dict[str, str]):
        self._local, self._parent, self._tags = local, parent, tags
        self._remote = parent._remote

    def inc(self, amount: float = 1) -> None:
        self._local.inc(amount)
        if amount > 0:  # Ray's counters take positive increments only
            self._remote.inc(amount, tags=self._tags)

    def set(self, value: float) -> None:
        self._local.set(value)
        self._remote.set(value, tags=self._tags)
        self._parent.last[tuple(self._tags.items())] = value

    def observe(self, amount: float) -> None:
        self._local.observe(amount)
        self._remote.observe(amount, tags=self._tags)


class Mirrored:
    """A prometheus_client metric whose every update is also recorded on a Ray metric."""

    def __init__(self, local, remote):
        self._local, self._remote = local, remote
        self._names = tuple(local._labelnames)
        self.last: dict[tuple, float] = {}  # gauges: the last value of each label set

    def labels(self, *values, **named) -> MirroredChild:
        child = self._local.labels(*values, **named)
        pairs = zip(self._names, values, strict=True) if values else ((k, named[k]) for k in self._names)
        return MirroredChild(child, self, {k: str(v) for k, v in pairs})

    def refresh(self) -> None:
        for tags, value in list(self.last.items()):
            self._remote.set(value, tags=dict(tags))

    def __getattr__(self, name: str):  # anything else is the local metric's
        return getattr(self._local, name)


def ray_twin(metric):
    """The Ray metric of the same name, type, description, labels (and buckets)."""
    from ray.serve import metrics as serve_metrics

    name, doc, tags = metric._name, metric._documentation, tuple(metric._labelnames)
    if isinstance(metric, Counter):
        return serve_metrics.Counter(name, description=doc, tag_keys=tags)
    if isinstance(metric, Gauge):
        return serve_metrics.Gauge(name, description=doc, tag_keys=tags)
    if isinstance(metric, Histogram):
        bounds = [b for b in metric._upper_bounds if b != float("inf")]
        return serve_metrics.Histogram(name, description=doc, boundaries=bounds, tag_keys=tags)
    raise TypeError(f"{name}: no Ray twin for {type(metric).__name__}")


def mirror_to_ray(metrics: Metrics, refresh_s: float | None = REFRESH_S) -> list[str]:
    """Mirror every labelled metric of the app's Metrics in place (the app, its routes and
    services hold this object, so they record on both from now on), and keep the gauges' last
    values recorded (a daemon thread, every refresh_s); the names mirrored."""
    mirrored, gauges = [], []
    for attr, metric in list(vars(metrics).items()):
        if isinstance(metric, Counter | Gauge | Histogram) and metric._labelnames:
            twin = Mirrored(metric, ray_twin(metric))
            setattr(metrics, attr, twin)
            mirrored.append(metric._name)
            if isinstance(metric, Gauge):
                gauges.append(twin)
    if gauges and refresh_s:
        threading.Thread(target=_refresh, args=(gauges, refresh_s), name="ray-gauges", daemon=True).start()
    return mirrored


def _refresh(gauges: list[Mirrored], every_s: float) -> None:
    while True:  # for the life of the replica's process
        time.sleep(every_s)
        for gauge in gauges:
            gauge.refresh()
