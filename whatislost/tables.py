"""Tables stage: the paper's tables from tables/populations.csv (rows: sparsity, columns: loss/method).

Table 1: PIE count and test accuracy; Tables 4 and 5: Q-Score, Z-Score and ||h||_1 of SCL
and Sup models; Table 6: PD-Score of PIEs and non-PIEs (Corti et al. 2022). Cells are
'mean±std [95% CI]' (what the ± is over, and n, differ by table: CAPTIONS says which); PIE
counts 'count [95% CI]' with the tied samples and the count under the other tie rule beside
them. The dense row repeats the dense population of each column's loss. Written as CSV and
Markdown, one block per (dataset, model).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .identity import column_name, percent_label

# the paper's column order; other (loss, method) pairs follow alphabetically
PAPER_ORDER = [("ce", "gmp"), ("ce", "oneshot"), ("supcon", "delta_gmp"), ("supcon", "gmp"), ("supcon", "oneshot")]


def _number(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def cell(mean, std, decimals=2, low=None, high=None, n=None) -> str:
    """'mean±std', then ' [low, high]' (a confidence interval) and ' n=<n>' when given; '' for a value that was
    not computed, 'nan' for one that was and is not a number."""
    if mean is None:
        return ""
    if isinstance(mean, float) and math.isnan(mean):
        return "nan" + (f" n={int(n)}" if _number(n) else "")
    text = f"{mean:.{decimals}f}±{std:.{decimals}f}"
    if _number(low) and _number(high):
        text += f" [{low:.{decimals}f}, {high:.{decimals}f}]"
    return text + (f" n={int(n)}" if _number(n) else "")


def count_cell(count, low=None, high=None) -> str:
    """'119 [83, 152]': a count and its confidence interval (rounded outwards to whole samples)."""
    if not _number(count):
        return ""
    text = str(int(count))
    if _number(low) and _number(high):
        text += f" [{math.floor(low + 1e-9)}, {math.ceil(high - 1e-9)}]"
    return text


def ties_cell(tied, other, other_rule: str, warn=False) -> str:
    """'197 tied; max: 107 ⚠': samples whose modal label is tied (dense or pruned population), and the PIE count
    under the other tie rule; ⚠ when that count differs by more than 5%."""
    if not _number(tied):
        return ""
    text = f"{int(tied)} tied"
    if _number(other):
        text += f"; {other_rule}: {int(other)}"
    return text + (" ⚠" if warn is True or str(warn) == "True" else "")


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


def build_table(pops: pd.DataFrame, columns: list, fields: list, tie_break: str = "min") -> pd.DataFrame:
    """rows: sparsity (dense 0 first); for each (loss, method) column and (title, field, kind) field a cell.

    kind: 'count' (PIE count [CI]; none in the dense row), 'ties' (tied samples; count under the rule other than
    tie_break), 'acc' (mean±std [CI] n=<models>), 'ms' (mean±std [CI]), 'ms_n' (mean±std [CI] n=<field>_n)."""
    other = "max" if tie_break == "min" else "min"
    sparsities = sorted({0, *pops.sparsity[pops.method != "dense"].tolist()})
    records = []
    for s in sparsities:
        rec = {"sparsity %": percent_label(s)}
        for loss, method in columns:
            row = lookup(pops, loss, method, s)
            for title, name, kind in fields:
                label = f"{column_name(loss, method)} {title}" if title else column_name(loss, method)
                if kind == "count":
                    rec[label] = "" if s == 0 else count_cell(_get(row, name), _get(row, f"{name}_ci_low"),
                                                              _get(row, f"{name}_ci_high"))
                elif kind == "ties":
                    rec[label] = "" if s == 0 else ties_cell(_get(row, name), _get(row, "pie_count_other"), other,
                                                             _get(row, "pie_tie_warning"))
                else:
                    n = {"acc": "n_models", "ms_n": f"{name}_n"}.get(kind)
                    rec[label] = cell(_get(row, f"{name}_mean"), _get(row, f"{name}_std"), low=_get(row, f"{name}_ci_low"),
                                      high=_get(row, f"{name}_ci_high"), n=_get(row, n) if n else None)
        records.append(rec)
    return pd.DataFrame(records)


TABLES = {
    "table1": ("Table 1: PIE count and test accuracy (%)", None,
               [("PIE", "pie_count", "count"), ("ties", "pie_tied", "ties"), ("acc", "acc", "acc")]),
    "table4": ("Table 4: Q-Score, Z-Score, ||h||_1 of SCL models", ["supcon"],
               [("Q", "q", "ms"), ("Z", "z", "ms"), ("L1", "l1", "ms")]),
    "table5": ("Table 5: Q-Score, Z-Score, ||h||_1 of Sup models", ["ce"],
               [("Q", "q", "ms"), ("Z", "z", "ms"), ("L1", "l1", "ms")]),
    "table6": ("Table 6: PD-Score of PIEs and non-PIEs", None, [("PIE", "pd_pie", "ms_n"), ("non-PIE", "pd_nonpie", "ms_n")]),
}
_PER_SAMPLE = ("± is the std over the test samples (n in each block's heading) of each sample's score averaged over "
               "the population's models; [low, high] is the 95% bootstrap interval of the mean, resampling the "
               "population's models.")
# what every cell of a table says: what its ± is over, what its interval is, what n is
CAPTIONS = {
    "table1": "PIE: test samples whose modal label (the class most of the population's models predict) differs from "
              "the dense population's, with a 95% bootstrap interval (the models of both populations resampled; the "
              "spread of the resampled counts centred on the observed count). ties: samples whose modal label is tied "
              "in the dense or the pruned population, and the PIE count under the other tie rule (--tie-break); ⚠ when "
              "that count differs by more than 5%. acc: test accuracy %, mean±std over the population's n models, "
              "[95% bootstrap interval of the mean, resampling models].",
    "table4": "Q-Score, Z-Score and ||h||_1 of each test sample's representation; " + _PER_SAMPLE,
    "table5": "Q-Score, Z-Score and ||h||_1 of each test sample's representation; " + _PER_SAMPLE,
    "table6": "Prediction depth of each test sample averaged over the population's depth models. ± is the std over the "
              "n samples of the cell (its PIEs, or the rest; the dense row splits by the union of the PIE sets of every "
              "population compared with it); [low, high] is the 95% bootstrap interval of the mean, resampling the "
              "depth models.",
}


def to_markdown(df: pd.DataFrame) -> str:
    """A plain GitHub table (pandas' to_markdown needs tabulate, which we do not pull in)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def group_note(pops: pd.DataFrame) -> str:
    """'450 test images, 2-5 models per population': the n of a (dataset, model) block."""
    parts = []
    if "n_test" in pops and pops.n_test.notna().any():
        parts.append(f"{int(pops.n_test.max())} test images")
    if "n_models" in pops and pops.n_models.notna().any():
        low, high = int(pops.n_models.min()), int(pops.n_models.max())
        parts.append(f"{low if low == high else f'{low}-{high}'} models per population")
    return ", ".join(parts)


def write_tables(populations: pd.DataFrame, folder: Path, tie_break: str = "min") -> dict:
    """Write table1/4/5/6 as CSV and Markdown into folder; return {name: [(group, DataFrame)]}."""
    folder = Path(folder)
    written = {}
    for name, (title, losses, fields) in TABLES.items():
        blocks, md = [], [f"# {title}\n", f"{CAPTIONS[name]}\n"]
        for (dataset, model), pops in populations.groupby(["dataset", "model"], sort=True):
            columns = pruned_columns(pops, losses)
            if not columns:
                continue
            table = build_table(pops, columns, fields, tie_break)
            if table.drop(columns=["sparsity %"]).replace("", pd.NA).isna().all().all():
                continue  # metric not computed for this group
            table = table.loc[:, (table != "").any(axis=0)]  # e.g. no ties column in an eval without PIEs
            blocks.append((f"{dataset}-{model}", table))
            note = group_note(pops)
            md += [f"## {dataset}, {model}" + (f" ({note})" if note else "") + "\n", to_markdown(table), ""]
        written[name] = blocks
        if blocks:
            pd.concat([t.assign(group=g) for g, t in blocks]).to_csv(folder / f"{name}.csv", index=False)
            (folder / f"{name}.md").write_text("\n".join(md))
    return written
