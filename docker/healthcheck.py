"""Container health check: exit 0 when GET <url> answers 200 (e.g. /readyz), else 1.

Python rather than curl: the runtime image has no curl, and the venv's Python is always there.
"""

import sys
import urllib.error
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/readyz"
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
