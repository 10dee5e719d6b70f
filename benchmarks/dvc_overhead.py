"""What DVC costs on top of Kedro: a no-op `dvc repro` and `dvc status` against Kedro's start-up.

    python benchmarks/dvc_overhead.py                      # a tiny copy of the project
    python benchmarks/dvc_overhead.py --project .          # a reproduced workspace
    python benchmarks/dvc_overhead.py --full-run-seconds 780

Without --project, it builds a tiny copy of the project (tests/project_copy.py), times its full
`dvc repro`, then measures. With --project, the workspace must be reproduced already (`dvc
repro`), so that a repro has nothing to do. Each command runs --repeat times; the median counts.
Kedro's start-up is `kedro registry list` (bootstrap, settings, the pipeline registry), the part
of every `kedro run` that is not the pipeline itself. The issue's target: a no-op `dvc repro`
under 5% of a full run of the default pipeline (pass that run's wall time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A test helper: the same tiny copy the tests use.
from tests import project_copy as pc  # noqa: E402


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    output = pc.run(args, cwd)
    return time.perf_counter() - start, output


def median_seconds(args: list[str], cwd: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        seconds, output = timed(args, cwd)
        if args[:2] == ["dvc", "repro"] and pc.ran_stages(output):
            sys.exit(f"`dvc repro` was not a no-op in {cwd}: run it once first.\n{output}")
        times.append(seconds)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, help="a reproduced project (default: tiny copy)")
    parser.add_argument("--full-run-seconds", type=float, help="wall time of a full run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="dvc-overhead-") as tmp:
        if args.project:
            project = args.project.resolve()
        else:
            project = pc.make_project(Path(tmp) / "project")
            pc.run(["kedro", "dvc", "generate", "--env", pc.TINY_ENV], project)
            pc.init_repo(project)
            full, _ = timed(["dvc", "repro"], project)
            rows.append(("full `dvc repro` (tiny config, 9 stages)", full))
        repro = median_seconds(["dvc", "repro"], project, args.repeat)
        status = median_seconds(["dvc", "status"], project, args.repeat)
        kedro = median_seconds(["kedro", "registry", "list"], project, args.repeat)
    rows += [
        ("no-op `dvc repro`", repro),
        ("`dvc status`", status),
        ("kedro start-up (`kedro registry list`)", kedro),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"project: {project if args.project else 'tiny copy'}; median of {args.repeat} runs")
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:7.2f} s")
    print(f"  no-op dvc repro / kedro start-up   {repro / kedro:6.2f}x")
    print(f"  dvc status / kedro start-up        {status / kedro:6.2f}x")
    if not args.project:
        print(f"  no-op dvc repro / tiny full run    {repro / rows[0][1]:7.2%}")
    if args.full_run_seconds:
        share = repro / args.full_run_seconds
        verdict = "meets" if share < 0.05 else "misses"
        print(f"  no-op dvc repro / full run         {share:7.2%}  ({verdict} the 5% target)")


if __name__ == "__main__":
    main()
