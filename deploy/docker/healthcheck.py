"""Container health check: exit 0 when the server answers 200 on /v2/health/ready.

Standard library only (the image has no curl). The port comes from FWSERVE_PORT, as for the
server itself; FWSERVE_HEALTHCHECK_URL overrides the whole URL.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("FWSERVE_HEALTHCHECK_URL") or (
        f"http://127.0.0.1:{os.environ.get('FWSERVE_PORT', '8000')}/v2/health/ready"
    )
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("FWSERVE_HEALTHCHECK_TIMEOUT", "3"))) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
