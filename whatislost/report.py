"""Report stage: EVAL_DIR/report/index.html, one page with the whole study. `whatislost-report EVAL_DIR`.

whatislost-eval builds it at its end; whatislost-report rebuilds it (and the figures) from
an existing eval folder. The page opens with an overview (every population's accuracy and PIE
count with their 95% intervals, tied samples, the count under the other tie rule, warnings where
the tie rule could change a conclusion) and the significance tests (Sup vs SCL PIE counts, classes
whose recall changed), then the run inventory (populations, model counts, recipes, missing or
failed runs), Tables 1 and 4-6 with what each ± is over and n, every figure (whatislost.figures),
and each population's configuration and recipe. Plain HTML and CSS, no JavaScript, nothing
fetched: the figures are embedded (PNG as data: URIs; the PDFs and CSVs beside it are linked),
so index.html alone can be mailed. Every string that comes from data, configs or file names is
HTML-escaped (and URL-quoted in src/href); index.html is written under a temporary name and
renamed; figures the report no longer draws are removed (only those whatislost listed as its own
in EVAL_DIR/.whatislost-eval, see whatislost.evalfolder).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import yaml

import whatislost

from .cli import UserError, run_cli
from .evalfolder import atomic_write_text, load_summary, record_report, writable
from .figures import draw_figures, figure_columns, load_populations, pct, pick_sparsity
from .identity import method_name
from .tables import CAPTIONS, TABLES, column_name, count_cell, group_note

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1280px;
       margin: 0 auto; padding: 1em 2em 4em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; margin-top: 2.2em; } h3 { margin-top: 1.6em; }
.meta { color: #555; } nav a { margin-right: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 14px; }
.scroll { overflow-x: auto; max-width: 100%; } .scroll table { margin: 0.3em 0; }
.caption { color: #444; max-width: 1000px; font-size: 14px; }
.warn { background: #fff0f0; border-left: 4px solid #c0392b; padding: 0.4em 0.8em; }
.sig { font-weight: 600; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f3f7; } td.text, th.text { text-align: left; }
figure { margin: 1.2em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; max-width: 1000px; }
.missing { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.4em 0.8em; }
.ok { color: #2a7a2a; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
pre { background: #f6f6f6; padding: 0.8em; overflow: auto; font-size: 13px; }
"""


def esc(value) -> str:
    """Text for HTML content and attribute values: & < > " ' escaped."""
    return html.escape(str(value), quote=True)


def url(path) -> str:
    """A relative file path for src/href: every character but letters, digits and '/_.-~' %-quoted, then escaped."""
    return esc(quote(Path(path).as_posix(), safe="/"))


def read_summary(eval_dir: Path) -> dict:
    """summary.json of an eval folder; UserError (one line) when missing, truncated or not an eval summary."""
    return load_summary(eval_dir)


def read_config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def seed_ranges(seeds) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    seeds, parts = sorted(set(seeds)), []
    for s in seeds:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def html_table(df: pd.DataFrame, text_columns=()) -> str:
    """A plain table in a box that scrolls sideways when the table is wider than the page; columns named in
    text_columns are left-aligned."""
    def cells(values, tag):
        return "".join(f'<{tag} class="text">{esc(v)}</{tag}>' if c in text_columns else f"<{tag}>{keep_together(v)}</{tag}>"
                       for c, v in zip(df.columns, values))
    rows = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in df.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{cells(df.columns, "th")}</tr></thead><tbody>{rows}</tbody></table></div>'


def keep_together(value) -> str:
    """Escaped text whose intervals ('[72.44, 77.11]') do not break across lines in a narrow cell."""
    return re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" ", "&nbsp;"), esc(value))


def read_table(path: Path):
    """A CSV of the eval folder, or None when it is missing or cannot be read."""
    try:
        return pd.read_csv(path) if Path(path).is_file() else None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return None


def value(row, name):
    """row[name], or None when the column is missing or the value is NaN."""
    v = row.get(name) if hasattr(row, "get") else None
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else v


def mean_ci(mean, low, high, decimals: int = 2) -> str:
    """'81.22 [79.56, 82.89]'; the mean alone without an interval, '' without a mean."""
    if mean is None:
        return ""
    text = f"{mean:.{decimals}f}"
    return text + (f" [{low:.{decimals}f}, {high:.{decimals}f}]" if low is not None and high is not None else "")


def p_text(p) -> str:
    return "" if p is None or pd.isna(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


# ---------------------------------------------------------------- sections
def header(summary: dict, eval_dir: Path) -> str:
    settings = ", ".join(f"{k}: {v if not isinstance(v, list) else ','.join(map(str, v))}"
                         for k, v in dict(summary["settings"]).items())
    scored, computed = summary.get("models_scored", 0), summary.get("models_computed", 0)
    cached = scored - computed if isinstance(scored, int) and isinstance(computed, int) else "?"
    evaluated = f" &middot; evaluated {esc(summary['evaluated_at'])}" if summary.get("evaluated_at") else ""
    return (f"<h1>whatislost report</h1>"
            f'<p class="meta">Runs: <code>{esc(summary["runs_dir"])}</code> &middot; eval folder: '
            f"<code>{esc(Path(eval_dir).resolve())}</code><br>Eval settings: {esc(settings)}<br>"
            f"{esc(scored)} model(s) scored ({esc(computed)} computed, {esc(cached)} from cache){evaluated} &middot; "
            f"whatislost {esc(whatislost.__version__)} &middot; built {datetime.datetime.now():%Y-%m-%d %H:%M}</p>"
            '<nav><a href="#overview">Overview</a><a href="#significance">Significance</a><a href="#inventory">Runs</a>'
            '<a href="#tables">Tables</a><a href="#figures">Figures</a><a href="#configs">Configurations and recipes</a>'
            '<a href="../summary.json">summary.json</a></nav>')


def tie_warning(warning: str) -> bool:
    """Whether an eval warning is about the tie rule (shown in the overview, not among the missing runs)."""
    return "--tie-break" in warning


def overview(eval_dir: Path, summary: dict) -> str:
    """Every population in one long table per group: accuracy and PIE count with their 95% intervals, the tied
    samples and the PIE count under the other tie rule, classes whose recall changed; then every warning about
    ties, where the tie rule could change a conclusion."""
    settings = summary.get("settings", {})
    stats = summary.get("statistics") or {}
    rule = settings.get("tie_break", "min")
    other = "max" if rule == "min" else "min"
    pops = load_populations(eval_dir)
    out = ['<h2 id="overview">Overview</h2>',
           f'<p class="caption">One row per population. Accuracy: mean over the population\'s models [95% bootstrap '
           f"interval, models resampled{', ' + esc(stats['n_boot']) + ' resamples' if stats.get('n_boot') else ''}]. "
           "PIEs: test samples whose modal label differs from the dense reference's [95% bootstrap interval, the "
           f"models of both populations resampled]. Tied: samples whose modal label is tied in either population "
           f"(resolved with --tie-break {esc(rule)}); then the PIE count with --tie-break {esc(other)}, and the range "
           "of counts over every way of breaking the ties. Recall: classes whose recall changed significantly "
           "(see Significance).</p>"]
    for group, g in pops.groupby("group", sort=True):
        rows = []
        for _, r in g.iterrows():
            pruned = r["method"] != "dense"
            record = {"population": r["population"], "compared with": value(r, "reference") or "",
                      "models": int(r["n_models"]),
                      "accuracy % [95% CI]": mean_ci(value(r, "acc_mean"), value(r, "acc_ci_low"),
                                                     value(r, "acc_ci_high"))}
            if "pie_count" in g:
                tie_flag = " ⚠" if str(value(r, "pie_tie_warning")) == "True" else ""
                record.update({
                    "PIEs [95% CI]": count_cell(value(r, "pie_count"), value(r, "pie_count_ci_low"),
                                                value(r, "pie_count_ci_high")) if pruned else "",
                    "tied": "" if value(r, "pie_tied") is None else str(int(r["pie_tied"])),
                    f"PIEs, {other} rule": ("" if value(r, "pie_count_other") is None
                                            else f"{int(r['pie_count_other'])}{tie_flag}"),
                    "any tie rule": ("" if value(r, "pie_count_lower") is None
                                     else f"{int(r['pie_count_lower'])}-{int(r['pie_count_upper'])}")})
            if "recall_classes_down" in g:
                record["recall ↓ / ↑"] = ("" if value(r, "recall_classes_down") is None else
                                         f"{int(r['recall_classes_down'])} / {int(r['recall_classes_up'])}")
            rows.append(record)
        note = group_note(g)
        out.append(f"<h3>{esc(group)}" + (f" <small>({esc(note)})</small>" if note else "") + "</h3>")
        out.append(html_table(pd.DataFrame(rows), text_columns=("population", "compared with")))
    warnings = [w for w in summary.get("warnings", []) if tie_warning(w)]
    if warnings:
        out.append('<div class="warn"><b>The tie rule could change a conclusion.</b><ul>'
                   + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>")
    return "".join(out)


def significance(eval_dir: Path, summary: dict) -> str:
    """The Sup-vs-SCL PIE tests (tables/pie_comparison.csv) and the classes whose recall changed
    (tables/class_recall_tests.csv)."""
    stats = summary.get("statistics") or {}
    alpha, correction = stats.get("alpha", 0.05), stats.get("correction", "bh")
    correction_name = {"bh": "Benjamini-Hochberg", "holm": "Holm", "bonferroni": "Bonferroni",
                       "none": "no"}.get(correction, correction)
    out = ['<h2 id="significance">Significance</h2><h3>Does SCL have more PIEs than Sup?</h3>']
    tests = read_table(Path(eval_dir) / "tables" / "pie_comparison.csv")
    if tests is None or tests.empty:
        out.append('<p class="missing">No method and sparsity has PIEs of both Sup and SCL populations in this eval.</p>')
    else:
        out.append(
            f'<p class="caption">At each method and sparsity: a paired permutation test on the test samples that are '
            f"a PIE of one loss only (their labels swapped at random, {esc(int(tests.n_perm.iloc[0]))} times; the "
            "exact one-sided McNemar test). H0: being a PIE of SCL only and of Sup only are equally likely; one-sided "
            f"p-values, adjusted over the comparisons of each group ({esc(correction_name)} correction); significant "
            f"at {esc(alpha)}. SCL − Sup: the difference of the counts with a 95% bootstrap interval (the models of "
            "all four populations resampled). Other tie rule: the counts and adjusted p with the other --tie-break; "
            "⚠ where the rule changes which loss has more PIEs or the verdict.</p>")
        for (dataset, model), g in tests.groupby(["dataset", "model"], sort=True):
            rows = []
            for _, r in g.iterrows():
                diff = f"{int(r['diff']):+d}"
                if value(r, "diff_ci_low") is not None:
                    diff += f" [{r['diff_ci_low']:+.0f}, {r['diff_ci_high']:+.0f}]"
                verdict = "SCL more" if r["significant"] else "not significant"
                if str(value(r, "conclusion_depends_on_ties")) == "True":
                    verdict += " ⚠ tie rule"
                rows.append({"method": method_name(r["method"]), "sparsity %": pct(r["sparsity"]),
                             "Sup PIEs": int(r["n_sup"]), "SCL PIEs": int(r["n_scl"]), "SCL − Sup [95% CI]": diff,
                             "only Sup / only SCL": f"{int(r['sup_only'])} / {int(r['scl_only'])}",
                             "p": p_text(r["p_value"]), "p adjusted": p_text(r["p_adjusted"]), "verdict": verdict,
                             "other tie rule: Sup / SCL, p adj.": (
                                 f"{int(r['n_sup_other'])} / {int(r['n_scl_other'])}, {p_text(r['p_adjusted_other'])}"
                                 if value(r, "n_sup_other") is not None else "")})
            out.append(f"<h4>{esc(dataset)}-{esc(model)}</h4>" + html_table(pd.DataFrame(rows), ("method", "verdict")))
    out.append("<h3>Classes whose recall changed</h3>")
    recall = read_table(Path(eval_dir) / "tables" / "class_recall_tests.csv")
    if recall is None or recall.empty:
        out.append('<p class="missing">No pruned population has PIEs (a dense reference and 2+ models each) in this '
                   "eval.</p>")
    else:
        normalized = bool(recall.normalized.astype(str).eq("True").any())
        out.append(
            '<p class="caption">Per pruned population and class: Welch\'s t-test of the class recall of its models '
            "against its dense reference's (Hooker et al. 2019)" + (
                ", after subtracting each population's mean accuracy, as their code does, so a flagged class moved "
                "more than the overall accuracy" if normalized else "")
            + f"; p-values adjusted over the classes of each population ({esc(correction_name)} correction), "
            f"significant at {esc(alpha)}. Points: percentage points of recall, pruned − dense (raw, not "
            "normalised).</p>")
        for (dataset, model), g in recall.groupby(["dataset", "model"], sort=True):
            rows = []
            for population, p in g.groupby("population", sort=False):
                flagged = p[p.significant.astype(str) == "True"]

                def listed(part):
                    return ", ".join(f"{c.class_name} ({100 * c.diff:+.1f} pts, p adj. {p_text(c.p_adjusted)})"
                                     for c in part.itertuples()) or "none"
                rows.append({"population": population, "compared with": p.reference.iloc[0],
                             "models (dense / pruned)": f"{int(p.n_dense.iloc[0])} / {int(p.n_pruned.iloc[0])}",
                             "lower recall": listed(flagged[flagged.norm_diff < 0]),
                             "higher recall": listed(flagged[flagged.norm_diff > 0]),
                             "smallest p adj.": p_text(p.p_adjusted.min())})
            out.append(f"<h4>{esc(dataset)}-{esc(model)}</h4>"
                       + html_table(pd.DataFrame(rows), ("population", "compared with", "lower recall", "higher recall")))
    links = [f'<a href="{url(f"../tables/{n}")}">{esc(n)}</a>' for n in ("pie_comparison.csv", "class_recall_tests.csv")
             if (Path(eval_dir) / "tables" / n).is_file()]
    if links:
        out.append(f"<p>{' &middot; '.join(links)}</p>")
    return "".join(out)


def inventory(summary: dict) -> str:
    """Populations with model counts, seeds and recipes; then every warning and gap: runs that
    failed or were skipped, populations with fewer models than their group's largest, grid cells not run."""
    rows, problems = [], [esc(w) for w in summary.get("warnings", []) if not tie_warning(w)]  # those: in the overview
    pops = summary["populations"]
    largest = {}
    for p in pops:
        group = f"{p['dataset']}-{p['model']}"
        largest[group] = max(largest.get(group, 0), p["n_models"])
    for p in pops:
        group = f"{p['dataset']}-{p['model']}"
        configs = [read_config(r) for r in p["runs"]]
        seeds = [c["seed"] for c in configs if "seed" in c]
        rows.append(dict(group=group, population=p["population"], models=p["n_models"], runs=len(p["runs"]),
                         seeds=seed_ranges(seeds) if seeds else "?",
                         recipe=configs[0].get("recipe", "?") if configs else "?",
                         folder=os.path.dirname(p["runs"][0]) if p["runs"] else ""))
        if p["n_models"] < len(p["runs"]):
            problems.append(f"{esc(p['population'])} ({esc(group)}): {esc(p['n_models'])} of {len(p['runs'])} "
                            "runs scored")
        if p["n_models"] < largest[group]:
            problems.append(f"{esc(p['population'])} ({esc(group)}): {esc(p['n_models'])} model(s), fewer than the "
                            f"{esc(largest[group])} of the group's largest population")
    # the study is a grid (loss/method x sparsity) per group: name its empty cells
    frame = pd.DataFrame(pops)
    for (dataset, model), g in frame.groupby(["dataset", "model"]):
        pruned = g[g.method != "dense"]
        have = set(zip(pruned.loss, pruned.method, pruned.sparsity))
        for loss, method in figure_columns(zip(pruned.loss, pruned.method)):
            absent = [s for s in sorted(set(pruned.sparsity)) if (loss, method, s) not in have]
            if absent:
                problems.append(f"{esc(column_name(loss, method))} ({esc(dataset)}-{esc(model)}) not run at sparsity "
                                f"{esc(', '.join(map(str, absent)))}%")
        for loss in sorted(set(pruned.loss) - set(g[g.method == "dense"].loss)):
            problems.append(f"no dense {esc(column_name(loss, 'dense'))} population ({esc(dataset)}-{esc(model)}): "
                            "no PIEs for it")
    gaps = "".join(f"<li>{p}</li>" for p in problems) if problems else '<li class="ok">none</li>'
    table = html_table(pd.DataFrame(rows), text_columns=("group", "population", "seeds", "recipe", "folder"))
    return (f'<h2 id="inventory">Runs</h2><p>{len(pops)} population(s), {esc(sum(r["models"] for r in rows))} model(s) '
            f"scored. A population is every finished run that agrees on everything that changes the trained model (data "
            f"content, architecture, loss, training settings, the recipe as applied, the exact target sparsity) and "
            f"differs only in its seed; runs that share a label but not these are shown as separate populations "
            f"marked [id].</p>{table}<h3>Missing or failed runs</h3><ul>{gaps}</ul>")


def tables(eval_dir: Path, summary: dict) -> str:
    """Tables 1, 4, 5, 6 from tables/<name>.csv, one block per (dataset, model) group."""
    out = ['<h2 id="tables">Tables</h2><p>Rows: sparsity; columns: loss/method. The dense row repeats the dense '
           "population of each column's loss. What each ± and interval is over, and n, is said under each table.</p>"]
    metrics_on = ", ".join(summary["settings"].get("metrics", []))
    pops = load_populations(eval_dir)
    notes = {group: group_note(g) for group, g in pops.groupby("group")}
    for name, (title, _, _) in TABLES.items():
        path = Path(eval_dir) / "tables" / f"{name}.csv"
        out.append(f"<h3>{esc(title)}</h3>")
        if not path.is_file():
            out.append(f'<p class="missing">Not computed in this eval (metrics: {esc(metrics_on)}).</p>')
            continue
        out.append(f'<p class="caption">{esc(CAPTIONS[name])}</p>')
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        for group, block in table.groupby("group", sort=True):
            note = f" <small>({esc(notes[group])})</small>" if notes.get(group) else ""
            out.append(f"<h4>{esc(group)}{note}</h4>" + html_table(block.drop(columns="group")))
        out.append(f'<p><a href="{url(f"../tables/{name}.csv")}">{esc(name)}.csv</a> &middot; '
                   f'<a href="{url(f"../tables/{name}.md")}">{esc(name)}.md</a></p>')
    return "".join(out)


def embedded(png: Path) -> str:
    """A PNG as a data: URI, so the page carries its figures (one file to mail)."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def figures(records: list, report_dir: Path) -> str:
    out = ['<h2 id="figures">Figures</h2><p>Shown embedded in this page; PNG and PDF files in <code>figures/</code> of '
           "the eval folder.</p>"]
    for group in sorted({r["group"] for r in records}):
        out.append(f"<h3>{esc(group)}</h3>")
        for r in (r for r in records if r["group"] == group):
            if not r["paths"]:
                out.append(f'<p class="missing"><b>{esc(r["title"])}</b>: not drawn: {esc(r["missing"])}.</p>')
                continue
            png, pdf = (os.path.relpath(p, report_dir) for p in r["paths"])
            out.append(f'<figure id="{esc(r["name"])}-{esc(group)}"><img src="{embedded(r["paths"][0])}" '
                       f'alt="{esc(r["title"])}, {esc(group)}"><figcaption><b>{esc(r["title"])}.</b> {esc(r["caption"])} '
                       f'<a href="{url(png)}">PNG</a> &middot; <a href="{url(pdf)}">PDF</a></figcaption></figure>')
    return "".join(out)


def configs(summary: dict) -> str:
    """Each population's config.yaml and recipe.yaml (first run; the others differ in seed and folder)."""
    out = ['<h2 id="configs">Configurations and recipes</h2><p>One run per population is shown; its other runs '
           "differ only in seed and output folder (One-Shot runs also in the dense run they start from).</p>"]
    for p in summary["populations"]:
        if not p["runs"]:
            continue
        run = Path(p["runs"][0])
        texts = []
        for name in ("config.yaml", "recipe.yaml"):
            path = run / name
            try:
                body = esc(path.read_text(encoding="utf-8", errors="replace")) if path.is_file() else \
                    f"({esc(name)} not found in {esc(run)})"
            except OSError as err:
                body = f"({esc(name)} cannot be read: {esc(err)})"
            texts.append(f"<h4>{esc(name)}</h4><pre>{body}</pre>")
        out.append(f"<details><summary><b>{esc(p['population'])}</b> ({esc(p['dataset'])}-{esc(p['model'])}): "
                   f"<code>{esc(run)}</code></summary>{''.join(texts)}</details>")
    return "".join(out)


# ---------------------------------------------------------------- the page
def build_report(eval_dir, scatter_sparsity=None, gallery_sparsity=None, umap_which: str = "first",
                 umap_colour: str = "true") -> Path:
    """Draw every figure of an eval folder and write EVAL_DIR/report/index.html; return its path."""
    eval_dir = Path(eval_dir)
    summary = read_summary(eval_dir)
    pops = load_populations(eval_dir)
    if not writable(eval_dir):
        raise UserError(f"cannot draw the report into {eval_dir}: the folder is not writable")
    for asked in (scatter_sparsity, gallery_sparsity):  # a sparsity the eval lacks: refused before anything is drawn
        if asked is not None:
            pick_sparsity(pops.sparsity[pops.method != "dense"], asked, max)
    records = draw_figures(eval_dir, scatter_sparsity=scatter_sparsity, gallery_sparsity=gallery_sparsity,
                           umap_which=umap_which, umap_colour=umap_colour)
    report_dir = eval_dir / "report"
    index = report_dir / "index.html"
    # figures of an earlier report that were not drawn now are stale: removed (only those whatislost wrote)
    record_report(eval_dir, [p for r in records for p in r["paths"]], index)
    report_dir.mkdir(exist_ok=True)
    body = header(summary, eval_dir) + overview(eval_dir, summary) + significance(eval_dir, summary) \
        + inventory(summary) + tables(eval_dir, summary) + figures(records, report_dir) + configs(summary)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>whatislost report: '
            f"{esc(summary['runs_dir'])}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
    atomic_write_text(index, page)
    print(f"report: {index}")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="whatislost-report", description="Rebuild the figures and the HTML report of a "
                                "whatislost-eval output folder.")
    p.add_argument("eval_dir", help="output folder of whatislost-eval (holds summary.json)")
    p.add_argument("--scatter-sparsity", type=float, help="sparsity %% of the Q/PD-Score scatters (default: highest)")
    p.add_argument("--gallery-sparsity", type=float, help="sparsity %% of the PIE gallery (default: lowest)")
    p.add_argument("--umap", default="first", choices=["first", "mean"],
                   help="UMAP of each population's first model or of its mean representation")
    p.add_argument("--umap-colour", dest="umap_colour", default="true", choices=["true", "predicted"],
                   help="colour the UMAP points by true class or by predicted class (the authors' figures)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    args = p.parse_args(argv)
    build_report(args.eval_dir, args.scatter_sparsity, args.gallery_sparsity, args.umap, args.umap_colour)
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-report"))


if __name__ == "__main__":
    cli()
