"""What runtime.load's checks cost: load an artifact with verify=True (every sha256) and with
verify=False (sizes, paths, external data only), interleaved, and time edgemed.artifact.verify
alone; medians of --rounds. Prints and writes JSON.

    python bench/bench_verify.py ARTIFACT [--rounds 5] [--out bench/results/verify/verify.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/verify/verify.json"))
    args = ap.parse_args()

    import edgemed.runtime
    from edgemed.artifact import read_manifest, verify

    mb = sum(f.bytes for f in read_manifest(args.artifact).files) / 1e6
    times: dict[str, list[float]] = {"load_verify_s": [], "load_no_verify_s": [], "verify_only_s": []}
    for _ in range(args.rounds):  # interleaved: the machine's load drifts
        for key, verify_hashes in (("load_verify_s", True), ("load_no_verify_s", False)):
            t = time.perf_counter()
            session = edgemed.runtime.load(args.artifact, verify=verify_hashes)
            times[key].append(time.perf_counter() - t)
            del session
        t = time.perf_counter()
        assert verify(args.artifact) == []
        times["verify_only_s"].append(time.perf_counter() - t)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    result = {"artifact": args.artifact.name, "artifact_mb": round(mb, 1), "rounds": args.rounds,
              "host": platform.processor() or platform.machine(), **med,
              "hash_mb_per_s": round(mb / med["verify_only_s"], 1), "runs": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
