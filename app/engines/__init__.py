"""Engines that run the app create_app builds: `tokenlean serve` runs it in this one process
under uvicorn (app/server.py); `--engine ray` runs it in Ray Serve replicas behind Ray's HTTP
proxy (ray_serve.py), with the replica header (replica.py), the replicas' metrics mirrored into
Ray's metrics (ray_metrics.py) and the proxy's own errors in the app's JSON (ray_proxy.py)."""
