"""Run a Python snippet in a fresh child process and report its wall time and peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_WRAPPER = """
import json, resource, sys, time
t0 = time.perf_counter()
{body}
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("__MEASURE__" + json.dumps({{"wall_s": wall, "peak_rss_bytes": peak, **globals().get("extra", {{}})}}))
"""


def measure(body: str, *, env: dict[str, str] | None = None) -> dict:
    """Run ``body`` (Python source) in a child interpreter; return wall_s and peak_rss_bytes.

    ``body`` may set a dict named ``extra`` with more figures to report.
    """
    code = _WRAPPER.format(body=textwrap.indent(textwrap.dedent(body), ""))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("__MEASURE__"):
            return json.loads(line[len("__MEASURE__") :])
    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
