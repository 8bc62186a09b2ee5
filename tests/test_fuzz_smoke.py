"""Issues 8 and 14: a short coverage-guided fuzz run of the request and response parsing
paths and of the HTTP/2 frame and header path (scripts/fuzz; the full smoke is
`scripts/fuzz --smoke`, 60 s). atheris is not a project dependency: the test is skipped,
saying why, when no Python with atheris is found."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "scripts", "fuzz")
SECONDS = int(os.environ.get("FORKPROXY_FUZZ_SMOKE_SECONDS", "6"))


@pytest.fixture(scope="module")
def fuzz_python():
    r = subprocess.run([sys.executable, FUZZ, "--check"], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        pytest.skip("atheris unavailable: run `scripts/fuzz --smoke` once (it creates "
                    "/tmp/forkproxy-fuzz-venv) or set FORKPROXY_FUZZ_PYTHON; "
                    + r.stderr.strip())
    return r.stdout.strip()


@pytest.mark.parametrize("target", ["request", "response", "http2"])
def test_fuzz_smoke(tmp_path, fuzz_python, target):
    r = subprocess.run([sys.executable, FUZZ, "--no-create", "--seconds", str(SECONDS),
                        "--target", target, "--corpus", str(tmp_path / target)],
                       capture_output=True, text=True, timeout=SECONDS + 120, cwd=ROOT)
    summary = [line for line in r.stdout.splitlines() if line.startswith("fuzz: target=")]
    assert r.returncode == 0 and summary, r.stdout[-2000:] + r.stderr[-4000:]
    stats = dict(re.findall(r"(\w+)=(\d+)", summary[0]))
    assert stats["crashes"] == "0", summary
    assert int(stats["executions"]) > 1000 and int(stats["coverage"]) > 20, summary
