"""Report stage: EVAL_DIR/report/index.html, one page with the whole study. `whatislost-report EVAL_DIR`.

whatislost-eval builds it at its end; whatislost-report rebuilds it (and the figures) from
an existing eval folder. The page shows the run inventory (populations, model counts,
recipes, missing or failed runs), Tables 1 and 4-6, every figure (whatislost.figures: PNGs
in EVAL_DIR/figures beside the report folder, PDFs linked) and each population's
configuration and recipe. Plain HTML and CSS, no JavaScript, nothing fetched: it opens
straight from disk, as long as the eval folder stays together. Every string that comes from
data, configs or file names is HTML-escaped (and URL-quoted in src/href); index.html is written
under a temporary name and renamed; figures the report no longer draws are removed (only those
whatislost listed as its own in EVAL_DIR/.whatislost-eval, see whatislost.evalfolder).
"""
from __future__ import annotations

import argparse
import datetime
import html
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import yaml

import whatislost

from .cli import UserError, run_cli
from .evalfolder import atomic_write_text, load_summary, record_report, writable
from .figures import draw_figures, figure_columns, load_populations, pick_sparsity
from .tables import TABLES, column_name

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1280px;
       margin: 0 auto; padding: 1em 2em 4em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; margin-top: 2.2em; } h3 { margin-top: 1.6em; }
.meta { color: #555; } nav a { margin-right: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 14px; }
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
    """A plain table; columns named in text_columns are left-aligned."""
    def cells(values, tag):
        return "".join(f'<{tag} class="text">{esc(v)}</{tag}>' if c in text_columns else f"<{tag}>{esc(v)}</{tag}>"
                       for c, v in zip(df.columns, values))
    rows = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in df.itertuples(index=False))
    return f"<table><thead><tr>{cells(df.columns, 'th')}</tr></thead><tbody>{rows}</tbody></table>"


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
            '<nav><a href="#inventory">Runs</a><a href="#tables">Tables</a><a href="#figures">Figures</a>'
            '<a href="#configs">Configurations and recipes</a><a href="../summary.json">summary.json</a></nav>')


def inventory(summary: dict) -> str:
    """Populations with model counts, seeds and recipes; then every warning and gap: runs that
    failed or were skipped, populations with fewer models than their group's largest, grid cells not run."""
    rows, problems = [], [esc(w) for w in summary.get("warnings", [])]
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
            f"scored. A population is every finished run with the same dataset, model, loss, pruning method and target "
            f"sparsity.</p>{table}<h3>Missing or failed runs</h3><ul>{gaps}</ul>")


def tables(eval_dir: Path, summary: dict) -> str:
    """Tables 1, 4, 5, 6 from tables/<name>.csv, one block per (dataset, model) group."""
    out = ['<h2 id="tables">Tables</h2><p>Cells are mean±std over each population\'s models (PIE counts: one '
           "number per population). The dense row repeats the dense population of each column's loss.</p>"]
    metrics_on = ", ".join(summary["settings"].get("metrics", []))
    for name, (title, _, _) in TABLES.items():
        path = Path(eval_dir) / "tables" / f"{name}.csv"
        out.append(f"<h3>{esc(title)}</h3>")
        if not path.is_file():
            out.append(f'<p class="missing">Not computed in this eval (metrics: {esc(metrics_on)}).</p>')
            continue
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        for group, block in table.groupby("group", sort=True):
            out.append(f"<h4>{esc(group)}</h4>" + html_table(block.drop(columns="group")))
        out.append(f'<p><a href="{url(f"../tables/{name}.csv")}">{esc(name)}.csv</a> &middot; '
                   f'<a href="{url(f"../tables/{name}.md")}">{esc(name)}.md</a></p>')
    return "".join(out)


def figures(records: list, report_dir: Path) -> str:
    out = ['<h2 id="figures">Figures</h2><p>PNG shown, PDF linked; all in <code>figures/</code> of the eval folder.</p>']
    for group in sorted({r["group"] for r in records}):
        out.append(f"<h3>{esc(group)}</h3>")
        for r in (r for r in records if r["group"] == group):
            if not r["paths"]:
                out.append(f'<p class="missing"><b>{esc(r["title"])}</b>: not drawn: {esc(r["missing"])}.</p>')
                continue
            png, pdf = (os.path.relpath(p, report_dir) for p in r["paths"])
            out.append(f'<figure id="{esc(r["name"])}-{esc(group)}"><img src="{url(png)}" alt="{esc(r["title"])}">'
                       f'<figcaption><b>{esc(r["title"])}.</b> {esc(r["caption"])} <a href="{url(pdf)}">PDF</a>'
                       "</figcaption></figure>")
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
def build_report(eval_dir, scatter_sparsity=None, gallery_sparsity=None, umap_which: str = "first") -> Path:
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
                           umap_which=umap_which)
    report_dir = eval_dir / "report"
    index = report_dir / "index.html"
    # figures of an earlier report that were not drawn now are stale: removed (only those whatislost wrote)
    record_report(eval_dir, [p for r in records for p in r["paths"]], index)
    report_dir.mkdir(exist_ok=True)
    body = header(summary, eval_dir) + inventory(summary) + tables(eval_dir, summary) + figures(records, report_dir) \
        + configs(summary)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>whatislost report: '
            f"{esc(summary['runs_dir'])}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
    atomic_write_text(index, page)
    print(f"report: {index}")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="whatislost-report", description="Rebuild the figures and the HTML report of a "
                                "whatislost-eval output folder.")
    p.add_argument("eval_dir", help="output folder of whatislost-eval (holds summary.json)")
    p.add_argument("--scatter-sparsity", type=int, help="sparsity %% of the Q/PD-Score scatters (default: highest)")
    p.add_argument("--gallery-sparsity", type=int, help="sparsity %% of the PIE gallery (default: lowest)")
    p.add_argument("--umap", default="first", choices=["first", "mean"],
                   help="UMAP of each population's first model or of its mean representation")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    args = p.parse_args(argv)
    build_report(args.eval_dir, args.scatter_sparsity, args.gallery_sparsity, args.umap)
    return 0


def cli():
    sys.exit(run_cli(main, prog="whatislost-report"))


if __name__ == "__main__":
    cli()
