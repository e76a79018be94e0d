"""The self-contained HTML report of a run: charts drawn by matplotlib as inline SVG, tables, no external files.

Everything comes from the run folder (metrics.jsonl, config.json, run.json and the example files), so a report
can be written at any time, with no network.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from twotower_cli.runs import atomic_write_bytes, read_json, read_json_or
from twotower_cli.tracking.metrics_log import read_metrics

CSS = """
body{font:15px/1.5 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1f2328;max-width:1180px;margin:0 auto;
padding:28px 32px;background:#fafbfc}
h1{font-size:28px;margin:0 0 4px}
h2{font-size:20px;margin:36px 0 12px;border-bottom:1px solid #d0d7de;padding-bottom:6px}
.sub{color:#57606a;margin:0 0 18px}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;min-width:130px}
.card .v{font-size:24px;font-weight:600}.card .k{color:#57606a;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
figure{background:#fff;border:1px solid #d0d7de;border-radius:8px;margin:0;padding:8px}
figure svg{width:100%;height:auto;display:block}figcaption{color:#57606a;font-size:13px;padding:0 8px 4px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13.5px}
th,td{border:1px solid #d0d7de;padding:5px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.hit{background:#dafbe1}.miss{color:#cf222e}
.doc{max-width:640px}code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
"""


def esc(x) -> str:
    return html.escape(str(x))


def svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]  # drop the XML prologue: the SVG is inline


def series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get(key) is not None:
            xs.append(r.get("step", len(xs)))
            ys.append(r[key])
    return xs, ys


def line_chart(records, keys: list[str], title: str, ylabel: str = "", x_key: str = "step", marker=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    drawn = False
    for key in keys:
        xs, ys = series(records, key) if x_key == "step" else epoch_series(records, key)
        if ys:
            ax.plot(xs, ys, label=key, marker=marker, linewidth=1.6)
            drawn = True
    ax.set_title(title, fontsize=12)
    ax.set_xlabel("step" if x_key == "step" else "epoch")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return svg(fig)


def epoch_series(records, key):
    rows = [r for r in records if "epoch/loss" in r and r.get(key) is not None]
    return [r["epoch"] for r in rows], [r[key] for r in rows]


def histogram(sims: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    if sims.get("positive"):
        ax.hist(sims["positive"], bins=40, alpha=0.6, label="query · relevant document", color="#2da44e")
        ax.hist(sims["negative"], bins=40, alpha=0.6, label="query · random document", color="#cf222e")
        ax.legend(fontsize=8, frameon=False)
    ax.set_title("The model's score on validation queries (best model)", fontsize=12)
    ax.set_xlabel("score, as the search ranks (cosine for a model without the exact lexical half)")
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return svg(fig)


def table(headers: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="num">{c:.4f}</td>' if isinstance(c, float) else f"<td>{esc(c)}</td>" for c in r)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        elif not isinstance(v, list) or len(v) < 20:
            out.append((prefix + k, v))
    return out


TEST_SYSTEMS = (("default search", "test/search/"), ("model alone", "test/"), ("BM25", "test/bm25/"))


def search_section(run: dict, cfg: dict) -> str:
    """The default search chosen on validation, and the model, BM25 and that search on the test queries."""
    plan = run.get("search") if isinstance(run.get("search"), dict) else {}
    test = run.get("test") if isinstance(run.get("test"), dict) else {}
    lexical = cfg.get("lexical_choice") if isinstance(cfg.get("lexical_choice"), dict) else {}
    parts = []
    if plan:
        how = plan.get("mode", "dense") + (f" at dense weight {plan.get('hybrid_weight'):g}"
                                            if plan.get("mode") == "hybrid" else "")
        parts.append(f"<p>Default search: <b>{esc(how)}</b>; {esc(plan.get('reason', ''))}.</p>")
    if lexical:
        parts.append(f"<p>Weight of the exact lexical half in the model's score: {esc(lexical.get('weight'))}; of a "
                     f"document's opening: {esc(lexical.get('lead_weight', 0.0))}.</p>")
    if not test:
        return "".join(parts) + "<p>No test split: the run has no figures measured apart from its choices.</p>"
    names = ["mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "map@100"]
    rows = [[label] + [float(test.get(prefix + n, 0.0)) for n in names] for label, prefix in TEST_SYSTEMS]
    parts.append(f"<p>On {esc(run.get('test_queries', '?'))} test queries, held out from training and from every "
                 "choice:</p>" + table(["system"] + names, rows, ["hit", "", ""]))
    if test.get("test/mrr@10", 1.0) < test.get("test/bm25/mrr@10", 0.0):
        parts.append('<p class="miss">The model alone is below BM25 on these queries: with few or noisy pairs the '
                     "default search leans on BM25 (check the data with <code>twotower validate-data</code>).</p>")
    return "".join(parts)


def build_html(run_dir: Path, title: str | None = None, description: str | None = None) -> str:
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json", "model configuration")
    run = read_json(run_dir / "run.json", "run record") if (run_dir / "run.json").exists() else {}
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    epochs = [r for r in records if "epoch/loss" in r]
    examples = read_json_or(run_dir / "data_examples.json", [])
    results = read_json_or(run_dir / "retrieval_examples.json", [])
    sims = read_json_or(run_dir / "similarities.json", {})
    best = run.get("best") or (epochs[-1] if epochs else {})
    title = title or f"twotower run {run_dir.name}"
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    source = data.get("name") or Path(str(data.get("path", "pairs"))).name  # a shared report shows no local path
    kinds = {"ngram": "An n-gram two-tower model", "cnn": "A character-CNN two-tower model",
             "mean": "A character-mean two-tower model",
             "transformer": "A two-tower model fine-tuned from a pretrained encoder"}  # (no local path in a report)
    description = description or f"{kinds.get(cfg['model']['encoder'], 'A two-tower model')} trained on {source}."
    test = run.get("test") if isinstance(run.get("test"), dict) else {}
    shown = ({f"{label} · {k.rsplit('/', 1)[1]}": test[k] for label, prefix in TEST_SYSTEMS
              for k in (prefix + "mrr@10", prefix + "recall@10") if isinstance(test.get(k), float)} if test else
             {k: v for k, v in best.items() if isinstance(v, float) and k.startswith(("val/", "eval/"))})
    cards = "".join(f'<div class="card"><div class="v">{v:.3f}</div><div class="k">{esc(k)}</div></div>'
                    for k, v in shown.items())
    info = (f"run <code>{esc(run_dir.name)}</code> · {len(epochs)} epochs, {steps[-1]['step'] if steps else 0} steps · "
            f"best epoch {esc(run.get('best_epoch', '-'))} · created {esc(run.get('created', '-'))}")
    charts = [
        ("Training loss", line_chart(steps, ["train/loss"], "Training loss per step", "loss")),
        ("Loss per epoch", line_chart(epochs, ["epoch/loss"], "Mean training loss per epoch", "loss", "epoch", "o")),
        ("Similarities", line_chart(steps, ["train/pos_sim", "train/neg_sim", "train/sim_gap"],
                                    "In-batch cosine similarities", "cosine")),
        ("Gradient norm", line_chart(steps, ["train/grad_norm"], "Gradient norm", "L2 norm")),
        ("Timing", line_chart(steps, ["perf/data_ms", "perf/forward_ms", "perf/backward_ms", "perf/optim_ms"],
                              "Time per step", "ms")),
        ("Validation", line_chart(epochs, [k for k in (epochs[-1] if epochs else {}) if k.startswith(("val/", "eval/"))
                                           and not k.endswith("map@100")], "Validation metrics per epoch", "",
                                  "epoch", "o")),
        ("Similarity histogram", histogram(sims)),
        ("Learning rate", line_chart(steps, ["train/lr"], "Learning rate schedule", "lr")),
    ]
    figs = "".join(f"<figure>{s}<figcaption>{esc(c)}</figcaption></figure>" for c, s in charts)
    final = table(["metric", "value"], [[k, v] for k, v in best.items()]) if best else "<p>No validation metrics.</p>"
    res_rows, res_cls = [], []
    for r in results:
        for h in r["results"]:
            res_rows.append([r["query"] if h["rank"] == 1 else "", h["rank"], h["score"], h["document"][:220],
                             "✔" if h["relevant"] else ""])
            res_cls.append("hit" if h["relevant"] else "")
    found = sum(r["found"] for r in results)
    which = "test" if test else "validation"
    res_html = (f"<p>What the default search returns for {len(results)} {which} queries: {found} have their "
                "relevant document in the top 5.</p>"
                + table(["query", "rank", "score", "document", "relevant"], res_rows, res_cls)) if results else \
        "<p>No held-out queries.</p>"
    ex_html = table(list(examples[0]), [[str(v)[:200] for v in e.values()] for e in examples]) if examples else ""
    settings = table(["setting", "value"], [[k, v] for k, v in flatten(cfg.get("settings", {}))])
    model = table(["model", "value"], [[k, v] for k, v in flatten(cfg.get("model", {}))]
                  + [[f"versions.{k}", v] for k, v in cfg.get("versions", {}).items()])
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>
<h1>{esc(title)}</h1><p class="sub">{esc(description)}</p><p class="sub">{info}</p>
<div class="cards">{cards}</div>
<h2>Charts</h2><div class="grid">{figs}</div>
<h2>The run's search, and its figures on held-out queries</h2>{search_section(run, cfg)}
<h2>Validation metrics (best epoch)</h2><p class="sub">Measured on the validation queries, on which the epoch, the
weights and the search were chosen: they flatter the run; the figures above do not.</p>{final}
<h2>Retrieval results</h2>{res_html}
<h2>Data examples</h2>{ex_html}
<h2>Configuration</h2><div class="grid"><div>{settings}</div><div>{model}</div></div>
<p class="sub" style="margin-top:30px">Written by twotower from the run folder; self-contained (no external files).</p>
</body></html>"""


def write_html_report(run_dir: Path, output: Path | None = None, title: str | None = None,
                      description: str | None = None) -> Path:
    output = Path(output) if output else Path(run_dir) / "report.html"
    atomic_write_bytes(output, build_html(run_dir, title, description).encode("utf-8"))
    return output
