"""The soak script itself, in a quick run: every fault phase, invariants checked.

The ten-minute run is `make soak`; its figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_quick_soak_keeps_every_invariant(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/soak.py",
            "--duration",
            "8",
            "--workers",
            "6",
            "--fault-scale",
            "0.05",
            "--report",
            str(report_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["requests"] > 500
    assert report["acknowledged_writes_checked"] > 0
    assert report["acknowledged_writes_missing"] == 0
    assert report["records_in_another_country"] == 0
    assert report["secret_leaks_in_output"] == 0
    assert report["in_flight_at_end"] == 0
    assert report["proxy_pool_at_end"]["acquired"] == 0
    assert report["sandbox_unauthorized"] <= report["injected_401"]
    assert "download CORRUPT" not in report["outcomes"]
    # The faults really fired: routing refusals and upstream 401s or 503s were seen.
    kinds = " ".join(report["outcomes"])
    assert "(routing)" in kinds
