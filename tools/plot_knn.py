"""kNN top-1 against epochs, from runs' ``metrics.jsonl`` (and published points), as a PNG.

    python tools/plot_knn.py OUT.png "moco_engine=results/.../metrics.jsonl" \
        --points "reference=10:47.2,30:67.4" --title "CIFAR-10, 200 epochs"

Each ``label=file`` is one line: the run's ``eval`` records (x = epochs completed, the record's
0-based epoch + 1; ``eval.at_start``'s record is epoch 0; with ``--x minutes``, the minutes of
training before the record instead: the sum of the ``epoch`` records' ``epoch_s``, evaluation and
start-up left out). ``--points label=x:y,...`` adds a line
of given figures; ``--level label=y`` a dashed horizontal line (chance, a random network).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moco_engine.run.plots import line_plot  # noqa: E402
from moco_engine.run.tracking import knn_curve, read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="*", metavar="LABEL=METRICS.jsonl")
    parser.add_argument("--points", action="append", default=[], metavar="LABEL=X:Y,...")
    parser.add_argument("--level", action="append", default=[], metavar="LABEL=Y")
    parser.add_argument("--title", default="kNN top-1 on the test split")
    parser.add_argument("--x", choices=["epochs", "minutes"], default="epochs")
    args = parser.parse_args()
    series = {}
    for item in args.runs:
        label, path = item.split("=", 1)
        series[label] = knn_curve(Path(path))
        if args.x == "minutes":
            seconds = [0.0]  # seconds[e]: training time of the first e epochs
            for record in read_metrics(Path(path), "epoch"):
                seconds.append(seconds[-1] + record["epoch_s"])
            series[label] = [(seconds[epochs] / 60, top1) for epochs, top1 in series[label]]
    for item in args.points:
        label, pairs = item.split("=", 1)
        series[label] = [(float(x), float(y)) for x, y in (p.split(":") for p in pairs.split(","))]
    levels = {label: float(y) for label, y in (item.split("=", 1) for item in args.level)}
    xlabel = "minutes of training" if args.x == "minutes" else "epochs"
    print(line_plot(series, args.out, args.title, xlabel, "kNN top-1 accuracy (%)", references=levels))


if __name__ == "__main__":
    main()
