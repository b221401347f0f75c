"""``modelfuse inspect`` speed and memory against the I/O floor, each run in a fresh process.

Reuses bench/merge_speed.py's checkpoints (3 x about 440 MB of bfloat16 Llama
tensors, generated once into --cache): the first is the base, the other two
are the models of a ties configuration (density 0.5, so that the sign conflict
and the top-k overlap are measured at 0.5 and at 1). Measured in one run:

- the I/O floor: read every input tensor once, with as many threads as
  inspect uses, and nothing else (inspect writes no checkpoint);
- ``modelfuse inspect CONFIG -o OUT --quiet`` (the command line, as users run it), and
  within it the reading and measuring alone (``inspection.json``'s ``seconds``).

Each inspect run is paired with a floor run just before it; the table gives the
fastest of each, the median of the pairs' ratios and the largest peak RSS, then
the figures of the last run.

    python bench/inspect_speed.py
    python bench/inspect_speed.py --repeat 5 --density 0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import LAYERS, _peak_rss_mb, generate  # noqa: E402


def child_io_floor(folders: list[Path], threads: int | None) -> dict:
    """Read every tensor of every input once, ``threads`` tensors at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from modelfuse.checkpoint import open_checkpoint
    from modelfuse.merge.execute import default_threads

    start = time.perf_counter()
    checkpoints = [open_checkpoint(f) for f in folders]
    names = checkpoints[0].keys()

    def read(name: str) -> int:
        return sum(c.read(name).numel() for c in checkpoints)

    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        list(pool.map(read, names))
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def child_inspect(
    config: Path, out: Path, threads: int | None, density: float | None, exact: bool
) -> dict:
    from modelfuse.cli import main as cli

    args = ["inspect", str(config), "-o", str(out), "--overwrite", "--quiet"]
    if threads is not None:
        args += ["--threads", str(threads)]
    if density is not None:
        args += ["--density", str(density)]
    if exact:
        args += ["--exact"]
    start = time.perf_counter()
    code = cli(args)
    if code != 0:
        raise SystemExit(code)
    seconds = time.perf_counter() - start
    measured = json.loads((out / "inspection.json").read_text())["seconds"]
    return {"seconds": seconds, "measure_seconds": measured, "peak_rss_mb": _peak_rss_mb()}


def run_child(
    args: argparse.Namespace, what: str, folders: list[Path], config: Path, out: Path
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--config",
        str(config),
        "--out",
        str(out),
        "--folders",
        *[str(f) for f in folders],
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.density is not None:
        command += ["--density", str(args.density)]
    if args.exact:
        command += ["--exact"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("bench/.cache"),
        help="where checkpoints are generated once",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="inspect threads (default: all cores)"
    )
    parser.add_argument(
        "--density", type=float, default=None, help="--density of the top-k overlap"
    )
    parser.add_argument("--repeat", type=int, default=5, help="paired runs (floor, inspect)")
    parser.add_argument("--exact", action="store_true", help="inspect --exact (every entry)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folders", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "io-floor":
        print(json.dumps(child_io_floor(args.folders, args.threads)))
        return
    if args.child == "inspect":
        print(
            json.dumps(child_inspect(args.config, args.out, args.threads, args.density, args.exact))
        )
        return

    import yaml

    folders = generate(args.cache, 3, LAYERS)
    size_mb = sum(p.stat().st_size for p in folders[0].glob("*.safetensors")) / 1e6
    scratch = Path(tempfile.mkdtemp(prefix="modelfuse-bench-inspect-", dir=args.cache))
    try:
        config = scratch / "ties.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "ties",
                    "base_model": str(folders[0]),
                    "models": [str(f) for f in folders[1:]],
                    "parameters": {"density": 0.5},
                }
            )
        )
        out = scratch / "inspect"
        print(
            f"3 checkpoints x {size_mb:.0f} MB (base + 2 models, bfloat16); "
            f"threads={args.threads or 'all cores'}{'; --exact' if args.exact else ''}"
        )
        pairs = []
        for _ in range(args.repeat):
            floor = run_child(args, "io-floor", folders, config, out)
            result = run_child(args, "inspect", folders, config, out)
            for what in (floor, result):
                if "error" in what:
                    raise SystemExit(f"failed: {what['error']}")
            pairs.append((floor, result))
        floor_seconds = min(f["seconds"] for f, _ in pairs)
        rss = max(r["peak_rss_mb"] for _, r in pairs)
        print(f"{'what':<34} {'seconds':>8} {'floor s':>8} {'x floor':>8} {'peak RSS MB':>12}")
        for key, what in [
            ("seconds", "inspect (the whole command)"),
            ("measure_seconds", "inspect (reading and measuring)"),
        ]:
            ratio = statistics.median(r[key] / f["seconds"] for f, r in pairs)
            print(
                f"{what:<34} {min(r[key] for _, r in pairs):8.2f} {floor_seconds:8.2f} "
                f"{ratio:8.2f} {rss:12.0f}"
            )
        print(
            "pairs (floor s, command s, measuring s): "
            f"{[(round(f['seconds'], 2), round(r['seconds'], 2), round(r['measure_seconds'], 2)) for f, r in pairs]}"
        )
        print(
            "the command also imports torch and matplotlib and draws the heat map; "
            "reading and measuring is inspection.json's seconds"
        )
        found = json.loads((out / "inspection.json").read_text())
        overall = found["overall"]
        print(
            f"figures: mean cosine {overall['mean_cosine']:.4f}, sign conflict {overall['sign_conflict']:.4f} "
            f"(density {found['conflict_density']}), at overlap density {found['overlap_density']}: "
            f"{overall['sign_conflict_at_overlap_density']}, mean top-k overlap {overall['mean_overlap']:.4f}"
        )
        print(f"recommendation: {found['recommendation']['summary']}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
