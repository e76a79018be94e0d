"""The W&B report of a run, built with wandb_workspaces.reports.v2.

Its runset is narrowed to this one run by ID with `filters` (not the runs-table search box). `spec()` serialises
the library's own report model to JSON without any network call (`twotower report --dry-run`).
"""

from __future__ import annotations

import json

SECTIONS = [
    ("Training loss curves", [("Training loss", ["train/loss"]), ("Loss per epoch", ["epoch/loss"])]),
    ("Similarity metrics", [("Cosine similarities", ["train/pos_sim", "train/neg_sim"]),
                            ("Similarity gap", ["train/sim_gap"])]),
    ("Performance and timing", [("Time per step (ms)", ["perf/data_ms", "perf/forward_ms", "perf/backward_ms",
                                                        "perf/optim_ms"]),
                                ("Throughput (pairs/s)", ["perf/pairs_per_s"])]),
    ("Gradient norms", [("Gradient norm", ["train/grad_norm"]), ("Learning rate", ["train/lr"])]),
    ("Validation metrics (the queries every choice was made on)",
     [("Validation", ["val/mrr@10", "val/ndcg@10", "val/recall@1", "val/recall@10", "val/recall@100"])]),
]
# the run's figures: the test queries, held out from training and every choice (one value each, at the last step)
SUMMARY = ("Held-out test queries: the model alone, BM25 and the default search",
           ["test/mrr@10", "test/bm25/mrr@10", "test/search/mrr@10", "test/recall@10", "test/bm25/recall@10",
            "test/search/recall@10"])
TABLES = [("What the default search returns for test queries", "retrieval/results"), ("Data examples", "data/examples")]


def build_report(run_id: str, project: str, entity: str, title: str, description: str):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    def runset():
        return [wr.Runset(entity=entity, project=project, name=f"run {run_id}",
                          filters=expr.And(expr.Metric("ID") == run_id))]

    blocks = [wr.H1(title), wr.P(description)]
    for heading, plots in SECTIONS:
        blocks.append(wr.H2(heading))
        blocks.append(wr.PanelGrid(runsets=runset(), panels=[
            wr.LinePlot(title=t, x="Step", y=ys, layout=wr.Layout(x=8 * i, y=0, w=8, h=6))
            for i, (t, ys) in enumerate(plots)]))
    blocks.append(wr.H2(SUMMARY[0]))
    blocks.append(wr.PanelGrid(runsets=runset(), panels=[
        wr.BarPlot(title=SUMMARY[0], metrics=SUMMARY[1], orientation="h", layout=wr.Layout(x=0, y=0, w=24, h=8))]))
    for heading, key in TABLES:
        blocks.append(wr.H2(heading))
        blocks.append(wr.PanelGrid(runsets=runset(), panels=[wr.WeavePanelSummaryTable(
            table_name=key, layout=wr.Layout(x=0, y=0, w=24, h=10))]))
    return wr.Report(project=project, entity=entity, title=title, description=description, blocks=blocks)


def spec(report) -> dict:
    """The report as the library models it, as JSON-ready data, with each block's type named."""
    import wandb_workspaces.reports.v2 as wr
    from pydantic import TypeAdapter

    data = json.loads(TypeAdapter(wr.Report).dump_json(report))
    for block, obj in zip(data["blocks"], report.blocks):
        block["type"] = type(obj).__name__
        for panel, pobj in zip(block.get("panels", []), getattr(obj, "panels", []) or []):
            panel["type"] = type(pobj).__name__
    return data
