"""Render the quality benchmark's result (the dict of `harness.run`) as rich tables and PNG plots, and write any
benchmark's JSON document.

Nothing here prints: tables are returned for the caller to show (`simsearch bench`, `python -m
simsearch.benchmarks`), files are written where asked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.table import Table

from simsearch.atomic import write_atomic


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def hits_table(result: dict) -> Table | None:
    rows = [e for e in result["encoders"] if e["hits"]]
    if not rows:
        return None
    ks = [r["k"] for r in rows[0]["hits"]["rows"]]
    h = rows[0]["hits"]
    p = result["protocol"]
    table = Table("encoder", *[f"hit@{k} %" for k in ks], "mean rank",
                  title=f"find the pair: {h['queries']:,} queries in {h['sets']} set(s), gallery {h['gallery']} "
                        f"({Path(p['dataset']).name}, {p['split']}, seed {p['seed']})",
                  caption="95% bootstrap confidence interval over queries in brackets", caption_justify="left")
    def add(label: str, hits: dict) -> None:
        table.add_row(label, *[f"{_pct(r['rate'])} [{_pct(r['ci_low'])}–{_pct(r['ci_high'])}]" for r in hits["rows"]],
                      f"{hits['mean_rank']:.1f}")

    for e in rows:
        hits = e["hits"]
        if hits["queries"] == h["queries"]:
            add(e["encoder"], hits)
        else:  # a reranker measured on fewer pair sets (time budget): its encoder-alone figures on the same queries
            add(f"{e['encoder']} ({hits['queries']:,} queries, {hits['sets']} sets)", hits)
            add(f"  without reranking, same {hits['queries']:,} queries", hits["before"])
    table.add_row("[dim]chance[/dim]", *[f"[dim]{_pct(r['chance'])}[/dim]" for r in h["rows"]], "")
    ref = result["reference"]["hits"]
    table.add_row(f"[dim]{ref['label']}[/dim]", *[f"[dim]{_pct(ref['hit_rate'][k])}[/dim]" if k in ref["hit_rate"]
                                                   else "" for k in ks], "")
    return table


def pairs_table(result: dict) -> Table | None:
    rows = [e for e in result["encoders"] if e["pairs"]]
    if not rows:
        return None
    table = Table("scorer", "pairs", "accuracy", "balanced acc", "precision", "recall", "F1", "ROC AUC",
                  "TN", "FP", "FN", "TP", title="same/different pairs (threshold chosen on train, then frozen)")
    for e in rows:
        for kind in ("balanced", "all_pairs"):
            m = e["pairs"][kind]
            table.add_row(f"{e['encoder']} ({kind.replace('_', ' ')})", f"{m['pairs']:,}", _pct(m["accuracy"]),
                          _pct(m["balanced_accuracy"]), _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]),
                          f"{m['roc_auc']:.3f}", f"{m['tn']:,}", f"{m['fp']:,}", f"{m['fn']:,}", f"{m['tp']:,}")
    for ref in result["reference"]["pairs"]:
        c = ref.get("confusion", {})
        table.add_row(f"[dim]{ref['label']}[/dim]", f"[dim]50,000 / {ref['all_pairs']:,}[/dim]",
                      f"[dim]{_pct(ref['all_pairs_accuracy'])} (all)[/dim]", f"[dim]{_pct(ref['balanced_accuracy'])}[/dim]",
                      "", "", "", "", *[f"[dim]{c[x]:,}[/dim]" if c else "" for x in ("tn", "fp", "fn", "tp")])
    return table


def checks_table(result: dict) -> Table | None:
    """Each trained encoder against its base: hit@1 / hit@10 in-domain, on unseen classes, on near-duplicates."""
    from simsearch.encoders.cards import CHECK_NAMES

    rows = [e for e in result["encoders"] if e.get("checks")]
    if not rows:
        return None
    table = Table("encoder", *[f"{label}: hit@1 / hit@10 % (base)" for label in CHECK_NAMES.values()],
                  title="what fine-tuning keeps: each trained encoder against its base on the split it did not train on",
                  caption="unseen classes: the classes its training left out (its card lists them)",
                  caption_justify="left")
    for e in rows:
        cells = []
        for name in CHECK_NAMES:
            c = e["checks"].get(name)
            cells.append(f"{_pct(c['model']['hit1'])} / {_pct(c['model']['hit10'])} "
                         f"({_pct(c['base']['hit1'])} / {_pct(c['base']['hit10'])})" if c else "—")
        table.add_row(e["encoder"], *cells)
    return table


def zeroshot_table(result: dict) -> Table | None:
    """Zero-shot classification by text prompts: top-k accuracy of each encoder with a text tower."""
    rows = [e for e in result["encoders"] if e.get("zeroshot")]
    if not rows:
        return None
    z = rows[0]["zeroshot"]
    p = result["protocol"]
    table = Table("encoder", *[f"top-{r['k']} %" for r in z["rows"]], "mean rank",
                  title=f"zero-shot classification: {z['queries']:,} images, {z['gallery']} classes "
                        f"({Path(p['dataset']).name}, {p['split']})",
                  caption=f"prompts: {' | '.join(z['templates'])}; 95% bootstrap confidence interval over images in "
                          "brackets; text -> image hit@k needs captions, which this dataset does not have",
                  caption_justify="left")
    for e in rows:
        table.add_row(e["encoder"], *[f"{_pct(r['rate'])} [{_pct(r['ci_low'])}–{_pct(r['ci_high'])}]"
                                      for r in e["zeroshot"]["rows"]], f"{e['zeroshot']['mean_rank']:.1f}")
    table.add_row("[dim]chance[/dim]", *[f"[dim]{_pct(r['chance'])}[/dim]" for r in z["rows"]], "")
    return table


def write_json(result: dict, out: Path) -> Path:
    return save_json(result, out / "bench.json")


def save_json(result: dict | list, path: Path, default=None) -> Path:
    """Every benchmark's JSON document, written where asked (its folder made first), atomically: a run killed
    while writing leaves the previous document, never half of one (kept files such as a scale db's facts are
    read back as a sign the work is done)."""
    write_atomic(path, json.dumps(result, indent=1, default=default).encode())
    return path


def write_plots(result: dict, out: Path) -> list[Path]:
    """hit@k curves (all encoders, chance, reference), ROC curves, confusion matrices, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with_hits = [e for e in result["encoders"] if e["hits"]]
    if with_hits:
        fig, ax = plt.subplots(figsize=(7, 5))
        for e in with_hits:
            ks = [r["k"] for r in e["hits"]["rows"]]
            ax.plot(ks, [r["rate"] for r in e["hits"]["rows"]], marker="o", label=e["encoder"])
            ax.fill_between(ks, [r["ci_low"] for r in e["hits"]["rows"]], [r["ci_high"] for r in e["hits"]["rows"]], alpha=0.2)
        rows = with_hits[0]["hits"]["rows"]
        ax.plot([r["k"] for r in rows], [r["chance"] for r in rows], "k:", label="chance")
        ref = result["reference"]["hits"]
        ax.plot(list(ref["hit_rate"]), list(ref["hit_rate"].values()), "k--", alpha=0.5,
                label="research (TLL, different dataset)")
        ax.set(xscale="log", xlabel="k", ylabel="hit rate", ylim=(0, 1),
               title=f"find the pair: gallery {with_hits[0]['hits']['gallery']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "hit_at_k.png"))
    with_pairs = [e for e in result["encoders"] if e["pairs"]]
    if with_pairs:
        fig, ax = plt.subplots(figsize=(6, 6))
        for e in with_pairs:
            for kind, style in (("balanced", "-"), ("all_pairs", "--")):
                m = e["pairs"][kind]
                ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], style, label=f"{e['encoder']} {kind} (AUC {m['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC: same vs different class")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "roc.png"))
        for e in with_pairs:
            fig, axes = plt.subplots(1, 2, figsize=(9, 4))
            for ax, kind in zip(axes, ("balanced", "all_pairs")):
                m = e["pairs"][kind]
                cm = [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
                ax.imshow([[v / max(1, sum(row)) for v in row] for row in cm], cmap="Blues", vmin=0, vmax=1)
                for r in range(2):
                    for c in range(2):
                        ax.text(c, r, f"{cm[r][c]:,}", ha="center", va="center")
                ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["different", "same"], yticklabels=["different", "same"],
                       xlabel="predicted", ylabel="true", title=f"{kind.replace('_', ' ')}: acc {_pct(m['accuracy'])}%")
            fig.suptitle(e["encoder"])
            written.append(_save(fig, out / f"confusion-{re.sub(r'[^A-Za-z0-9_.-]+', '-', e['encoder'])}.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
