"""Tables stage: the paper's tables from tables/populations.csv (rows: sparsity, columns: loss/method).

Table 1: PIE count and test accuracy; Tables 4 and 5: Q-Score, Z-Score and ||h||_1 of SCL
and Sup models; Table 6: PD-Score of PIEs and non-PIEs (Corti et al. 2022). Cells are
'mean±std'. The dense row repeats the dense population of each column's loss. Written as
CSV and Markdown, one block per (dataset, model).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .identity import column_name

# the paper's column order; other (loss, method) pairs follow alphabetically
PAPER_ORDER = [("ce", "gmp"), ("ce", "oneshot"), ("supcon", "delta_gmp"), ("supcon", "gmp"), ("supcon", "oneshot")]


def cell(mean, std, decimals=2) -> str:
    """'mean±std'; '' for a value that was not computed, 'nan' for one that was and is not a number."""
    if mean is None:
        return ""
    if isinstance(mean, float) and math.isnan(mean):
        return "nan"
    return f"{mean:.{decimals}f}±{std:.{decimals}f}"


def in_order(pairs, order) -> list:
    """(loss, method) pairs: those in `order` first, in that order, then the rest alphabetically."""
    pairs = set(pairs)
    return [p for p in order if p in pairs] + sorted(pairs - set(order))


def pruned_columns(pops: pd.DataFrame, losses=None) -> list:
    return in_order(((r.loss, r.method) for r in pops.itertuples()
                     if r.method != "dense" and (losses is None or r.loss in losses)), PAPER_ORDER)


def lookup(pops: pd.DataFrame, loss: str, method: str, sparsity: int):
    """The populations.csv row of (loss, method, sparsity); sparsity 0 is the loss's dense population. None if absent."""
    if sparsity == 0:
        method = "dense"
    hit = pops[(pops.loss == loss) & (pops.method == method) & (pops.sparsity == sparsity)]
    return None if hit.empty else hit.iloc[0]


def _get(row, name):
    return None if row is None or name not in row.index or pd.isna(row[name]) else row[name]


def build_table(pops: pd.DataFrame, columns: list, fields: list) -> pd.DataFrame:
    """rows: sparsity (dense 0 first); for each (loss, method) column and (title, field, kind) field a cell."""
    sparsities = sorted({0, *pops.sparsity[pops.method != "dense"].tolist()})
    records = []
    for s in sparsities:
        rec = {"sparsity %": f"{s:g}"}
        for loss, method in columns:
            row = lookup(pops, loss, method, s)
            for title, name, kind in fields:
                label = f"{column_name(loss, method)} {title}" if title else column_name(loss, method)
                if kind == "count":
                    value = _get(row, name)
                    rec[label] = "" if value is None or s == 0 else str(int(value))
                else:
                    rec[label] = cell(_get(row, f"{name}_mean"), _get(row, f"{name}_std"))
        records.append(rec)
    return pd.DataFrame(records)


TABLES = {
    "table1": ("Table 1: PIE count and test accuracy (%)", None, [("PIE", "pie_count", "count"), ("acc", "acc", "ms")]),
    "table4": ("Table 4: Q-Score, Z-Score, ||h||_1 of SCL models", ["supcon"],
               [("Q", "q", "ms"), ("Z", "z", "ms"), ("L1", "l1", "ms")]),
    "table5": ("Table 5: Q-Score, Z-Score, ||h||_1 of Sup models", ["ce"],
               [("Q", "q", "ms"), ("Z", "z", "ms"), ("L1", "l1", "ms")]),
    "table6": ("Table 6: PD-Score of PIEs and non-PIEs", None, [("PIE", "pd_pie", "ms"), ("non-PIE", "pd_nonpie", "ms")]),
}


def to_markdown(df: pd.DataFrame) -> str:
    """A plain GitHub table (pandas' to_markdown needs tabulate, which we do not pull in)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_tables(populations: pd.DataFrame, folder: Path) -> dict:
    """Write table1/4/5/6 as CSV and Markdown into folder; return {name: [(group, DataFrame)]}."""
    folder = Path(folder)
    written = {}
    for name, (title, losses, fields) in TABLES.items():
        blocks, md = [], [f"# {title}\n"]
        for (dataset, model), pops in populations.groupby(["dataset", "model"], sort=True):
            columns = pruned_columns(pops, losses)
            if not columns:
                continue
            table = build_table(pops, columns, fields)
            if table.drop(columns=["sparsity %"]).replace("", pd.NA).isna().all().all():
                continue  # metric not computed for this group
            blocks.append((f"{dataset}-{model}", table))
            md += [f"## {dataset}, {model}\n", to_markdown(table), ""]
        written[name] = blocks
        if blocks:
            pd.concat([t.assign(group=g) for g, t in blocks]).to_csv(folder / f"{name}.csv", index=False)
            (folder / f"{name}.md").write_text("\n".join(md))
    return written
