"""Docker HEALTHCHECK: alive when /livez answers on the API port (serve) or on the probe port (worker).

One image runs both roles and the check cannot see the command line, so it asks both ports.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    for port in (os.environ.get("PTQ4DM_PORT", "8000"), os.environ.get("PTQ4DM_HEALTH_PORT", "8001")):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=3) as response:
                if response.status == 200:
                    return 0
        except OSError:
            continue
    return 1


if __name__ == "__main__":
    sys.exit(main())
