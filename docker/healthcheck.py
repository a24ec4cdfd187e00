"""Container health check: exit 0 when the service's /readyz answers 200, 1 otherwise.

Standard library only (the slim images have no curl). The port comes from TOKENLEAN_PORT, the
same variable the service reads, so overriding the port keeps the check pointing at it.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("TOKENLEAN_PORT", "8000")
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "3"))) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
