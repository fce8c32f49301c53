"""Markdown of ``moco-bench`` figures: one case's tables (what ``moco-bench`` prints) and the
operator counts of a step."""

from __future__ import annotations


def case_table(r: dict) -> str:
    """One case of ``bench.run_case``: the two steps, MoCo's pieces, then what was added
    (operator counts, profile, input path). A two-tower case (``pairs``: images and captions)
    counts pairs/s, against both towers' supervised steps together."""
    b, w, pairs = r["batch"], r.get("tokens", 0), r.get("pairs", False)
    stem = " (CIFAR stem)" if r["cifar_stem"] and r["arch"].startswith("resnet") else ""
    arch = f"{r['arch']}/{r['patch_size']}" if r["arch"].startswith("vit") else r["arch"]
    size = (f"{r['image_size']} px + {w} tokens a caption" if pairs else f"{w} tokens a view" if w
            else f"{r['image_size']} px")
    if "supervised_s" not in r:  # moco-bench --ops: counts only
        towers = " and its text tower" if pairs else ""
        return f"## {r['case']}: {arch}{stem}{towers}, {size}, operators per step\n\n" + ops_table(r["ops_by_form"], "step")
    label = r.get("label", "MoCo")
    w = 0 if pairs else w  # a pair is the unit: images/s, no tokens/s column
    gib = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    mode = ", CUDA graphs" if r.get("cuda_graphs") else ", compiled" if r["compile"] else ""
    v3 = r.get("method") == "moco_v3"
    negatives = "MoCo v3 (the batch's keys)" if v3 else f"K {r['queue']}"
    floor = r.get("floor", 4 / 3)
    what = ("each tower's forward-backward and its momentum copy's forward" if pairs else
            "two views through f_q and f_k" if v3 else "a query forward-backward and a key forward")
    vocab = f", V {r['vocab']}" if pairs else ""
    lines = [
        f"## {r['case']}: {arch}{stem}{r.get('encoder', '')}{vocab}, {size}, batch {b}, "
        f"{negatives}, {r['precision']}{mode}"
        f"{', split-BN ' + str(r['bn_splits']) + ' (' + r['split_bn'] + ')' if r['bn_splits'] > 1 else ''} on {r['device_name']}",
        "",
        f"| step | ms (median) | {'chunks/s | tokens/s' if w else 'pairs/s' if pairs else 'images/s'} | peak memory GiB |",
        "| --- " * (5 if w else 4) + "|",
        *(step_row(name, r[f"{key}_s"], b, w, gib(r[f"{key}_peak_gib"]))
          for name, key in (("supervised (image + text)" if pairs else "supervised", "supervised"), (label, "moco"))),
        "",
        f"{label} / supervised: {r['ratio']:.2f} (median of {r['repeats']} paired rounds); the floor is {floor:.2f} "
        f"({what}): {r['ratio'] / floor:.2f}x the floor",
        "",
        f"| {label} piece (alone) | ms | % of the {label} step |",
        "| --- | --- | --- |",
    ]
    for piece, s in r["breakdown_s"].items():
        lines.append(f"| {piece} | {s * 1e3:.3f} | {100 * s / r['moco_s']:.1f} |")
    if r.get("ops"):
        lines += ["", ops_table({"supervised": r["ops"]["supervised"], label: r["ops"]["moco"]}, "step")]
    if "profile" in r:
        lines += ["", "```", r["profile"], "```"]
    if "data_s" in r:
        lines += ["", "| input path | ms per batch | images/s |", "| --- | --- | --- |"]
        for part, s in r["data_s"].items():
            lines.append(f"| {part} | {s * 1e3:.2f} | {b / s:,.0f} |")
    return "\n".join(lines)


def step_row(name: str, seconds: float, batch: int, tokens: int, peak: str) -> str:
    """A step's row: ms, samples/s (images or chunks), tokens/s for a text case (one view's
    batch x width: the tokens a step learns from, as images/s counts one view's images)."""
    rate = f"{batch / seconds:,.0f} |" + (f" {batch * tokens / seconds:,.0f} |" if tokens else "")
    return f"| {name} | {seconds * 1e3:.2f} | {rate} {peak} |"


def ops_table(counts: dict[str, dict], what: str) -> str:
    """Operators dispatched per step (``opcount.OpCounts.as_dict`` of each row), forward and
    backward, the optimizer and MoCo's updates included."""
    batch = any("batch" in c for c in counts.values())
    lines = [f"| {what} |{' batch |' if batch else ''} operators | compute (kernels) | views | allocations | host reads |",
             "| --- " * (6 + batch) + "|"]
    for name, c in counts.items():
        kinds = ", ".join(f"{k} {n}" for k, n in c.get("host_read_kinds", {}).items())
        lines.append(f"| {name} |{' ' + str(c['batch']) + ' |' if batch else ''} {c['total']:,} | {c['compute']:,} | "
                     f"{c['views']:,} | {c['allocations']:,} | {c.get('host_reads', 0)}{' (' + kinds + ')' if kinds else ''} |")
    return "\n".join(lines)
