#!/usr/bin/env python3
"""Runs the protocol probes: python3 tests/proto/run.py [NAME ...] (all when no name)."""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(__file__))
import probes

PROBES = {k[6:]: v for k, v in vars(probes).items() if k.startswith("probe_")}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PROBES)
    for n in names:
        print(f"== {n}", flush=True)
        try:
            PROBES[n]()
        except Exception:
            traceback.print_exc()
            probes.report(n, False, "probe raised")
    findings = [name for name, ok in probes.RESULTS if not ok]
    print(f"{len(probes.RESULTS) - len(findings)} checks passed, {len(findings)} findings"
          + (f": {', '.join(findings)}" if findings else ""))
    sys.exit(1 if findings else 0)
