"""Issue 17: `forkproxy tune` is a verb of the installed package. Quick mode for real: the
built-in origin, a forkproxy with 1 and 2 workers per core (pinned), wrk against it, and a
recommendation consistent with the numbers it printed; without wrk it says how to get it."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from conftest import needs_tools
from fp import PY, ROOT

from forkproxy.tune import Result, recommend

CPUS = len(os.sched_getaffinity(0))


@needs_tools("wrk")
def test_tune_quick_measures_and_recommends():
    before = set(glob.glob("/tmp/forkproxy-tune-*"))
    r = subprocess.run([PY, "-m", "forkproxy", "tune", "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = re.findall(r"^workers_per_core = (\d+): +(\d+) workers +(\d+) req/s +([\d.]+) us",
                      r.stdout, re.M)
    assert [int(k) for k, *_ in rows] == [1, 2], r.stdout
    results = [Result(int(k), int(w), float(rps), float(cpu)) for k, w, rps, cpu in rows]
    for res in results:
        assert res.workers == CPUS * res.per_core and res.rps > 0 and res.cpu_us > 0, r.stdout
    pick = recommend(results)
    assert f"recommended: workers_per_core = {pick.per_core} ({pick.workers} workers" in r.stdout
    assert r.stdout.rstrip().endswith(
        f'[server]\n  workers = "auto"\n  workers_per_core = {pick.per_core}'), r.stdout
    assert set(glob.glob("/tmp/forkproxy-tune-*")) == before  # its scratch directory is gone


def test_tune_without_wrk_says_how_to_get_it():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    r = subprocess.run([PY, "-m", "forkproxy", "tune", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "wrk is not installed" in r.stderr and "apt-get install wrk" in r.stderr


def test_recommend_is_the_fewest_within_three_percent():
    def res(k, rps):
        return Result(k, 2 * k, rps, 50.0)
    assert recommend([res(1, 1000), res(2, 1020), res(3, 1025)]).per_core == 1
    assert recommend([res(1, 900), res(2, 1000), res(3, 990)]).per_core == 2
    assert recommend([res(1, 500), res(2, 700), res(3, 1000)]).per_core == 3


def test_scripts_tune_is_a_thin_wrapper():
    with open(os.path.join(ROOT, "scripts", "tune")) as f:
        text = f.read()
    assert "exec .venv/bin/forkproxy tune" in text and "not pinned" not in text
