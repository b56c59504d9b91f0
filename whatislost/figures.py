"""Figures stage: the paper's figures drawn from an eval folder (whatislost-eval output).

Nothing is recomputed: every figure reads only the eval folder's CSV and NPZ files. One
function per figure and (dataset, model) group; each writes figures/<name>_<group>.png and
.pdf and returns the written paths. When the eval did not produce a figure's input (no
UMAP, no prediction depth, a single-model population without PIEs) the function raises
`MissingData` with the reason, which the report shows in the figure's place.

    acc_pies_<group>         accuracy and PIEs vs sparsity (95% CIs)  tables/populations.csv
    training_curves_<group>  loss, accuracy, lr, sparsity per epoch   figdata/training_<group>.csv
    layer_sparsity_<group>   sparsity of every pruned tensor          figdata/layer_sparsity_<group>.csv, training
    umap_<group>             UMAP grid (paper Figs 1, 5)              figdata/umap_<group>.csv
    qscore_<group>           Q-Score dense vs pruned (Fig 2)          tables/per_sample_<group>.csv
    pdscore_<group>          PD-Score dense vs pruned (Fig 3)         tables/per_sample_<group>.csv, populations
    pie_classes_<group>      PIEs per class (Figs 4, 7)               tables/pie_per_class.csv, pie_overlap.csv
    pie_gallery_<group>      PIE images with their labels (Fig 6)     figdata/pie_images_<group>.npz, per_sample
    cka_<group>              linear CKA with the dense models per probe tables/cka.csv (beyond the paper)

Colours are the Okabe-Ito palette (colour-blind safe): one per loss; every method gets its own
marker and line style (`method_styles`, generated for any method name), so series differ in
shape as well as colour.
"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from .cli import UserError
from .identity import loss_name, percent_label
from .tables import column_name, in_order, lookup

# the paper's figure columns (Figs 2-5, 7); other (loss, method) pairs follow alphabetically
FIGURE_ORDER = [("ce", "gmp"), ("ce", "oneshot"), ("supcon", "gmp"), ("supcon", "oneshot"), ("supcon", "delta_gmp")]
# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
LOSS_COLOURS = {"ce": "#0072B2", "supcon": "#D55E00"}  # Sup blue, SCL vermillion; other losses: the rest
METHOD_STYLES = {"dense": ("o", "-"), "gmp": ("o", "-"), "oneshot": ("s", "--"), "delta_gmp": ("^", ":")}  # (marker, line)
STYLE_POOL = [("D", "-."), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1, 1, 1))), ("X", (0, (1, 1))),
              ("*", (0, (6, 2, 1, 2))), ("<", (0, (9, 3))), (">", (0, (2, 2, 6, 2))), ("h", (0, (4, 1, 1, 1, 1, 1, 1, 1)))]
PIE_COLOUR = "#000000"  # PIEs: black crosses on top of the loss-coloured cloud (contrast in colour and shape)
PIE_MARKER = "x"


class MissingData(Exception):
    """The eval folder lacks what a figure needs; the message says what and why."""


# ---------------------------------------------------------------- reading the eval folder
def load_populations(eval_dir: Path) -> pd.DataFrame:
    """tables/populations.csv with a `group` column ('<dataset>-<model>', as in the file names)."""
    path = Path(eval_dir) / "tables" / "populations.csv"
    if not path.is_file():
        raise UserError(f"not an eval folder (no tables/populations.csv): {eval_dir}")
    try:
        pops = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path} cannot be read (truncated or damaged?): {str(err).strip().splitlines()[0]}") from None
    if not {"dataset", "model", "loss", "method", "sparsity", "population"} <= set(pops.columns):
        raise UserError(f"{path} is not a whatislost-eval populations table")
    pops["group"] = pops.dataset.astype(str) + "-" + pops.model.astype(str)
    return pops


def groups(eval_dir: Path) -> list:
    return sorted(load_populations(eval_dir).group.unique())


def figure_columns(pairs) -> list:
    """(loss, method) pairs in the paper's figure order."""
    return in_order(pairs, FIGURE_ORDER)


def pruned_pairs(pops: pd.DataFrame) -> list:
    return figure_columns((r.loss, r.method) for r in pops.itertuples() if r.method != "dense")


def population_label(pops: pd.DataFrame, loss: str, method: str, sparsity):
    """The population's column label in per-sample tables ('Sup/GMP/90'), or None if it was not scored."""
    row = lookup(pops, loss, method, sparsity)
    return None if row is None else row.population


def class_names(eval_dir: Path, group: str, n: int) -> list:
    """Class names saved with the PIE images (written for every group), else '0'..'n-1'."""
    path = Path(eval_dir) / "figdata" / f"pie_images_{group}.npz"
    names = [str(c) for c in np.load(path)["classes"]] if path.is_file() else []
    return names if len(names) >= n else [str(i) for i in range(n)]


def read_per_sample(eval_dir: Path, group: str) -> pd.DataFrame:
    path = Path(eval_dir) / "tables" / f"per_sample_{group}.csv"
    if not path.is_file():
        raise MissingData(f"{path.name} is missing")
    return pd.read_csv(path)


def read_figdata(eval_dir: Path, name: str, group: str, why: str) -> pd.DataFrame:
    """figdata/<name>_<group>.csv (training logs), with the population's loss, method and target sparsity from
    populations.csv as `_loss`, `_method`, `_target` (rows of populations not in it left out)."""
    path = Path(eval_dir) / "figdata" / f"{name}_{group}.csv"
    if not path.is_file():
        raise MissingData(f"{path.name} is missing ({why}, or the eval folder is of an older whatislost: run "
                          "whatislost-eval again)")
    frame = pd.read_csv(path)
    pops = load_populations(eval_dir)
    pops = pops[pops.group == group].drop_duplicates("population").set_index("population")
    frame = frame[frame.population.isin(pops.index)].copy()
    for column, source in (("_loss", "loss"), ("_method", "method"), ("_target", "sparsity")):
        frame[column] = frame.population.map(pops[source])
    if frame.empty:
        raise MissingData(f"{path.name} has no rows of this eval's populations")
    return frame


pct = percent_label  # 90.0 -> '90', 30.4 -> '30.4'


def pick_sparsity(available, asked, default):
    """The asked sparsity % if it is available (else a UserError listing the choices), or default(available)."""
    available = sorted({round(float(s), 6) for s in available})
    if asked is None:
        return default(available)
    match = [s for s in available if abs(s - float(asked)) < 1e-6]
    if not match:
        raise UserError(f"sparsity {pct(asked)}% not in this eval; available: {', '.join(map(pct, available))}")
    return match[0]


def same_sparsity(values: pd.Series, s) -> pd.Series:
    return (values.astype(float) - float(s)).abs() < 1e-6


# ---------------------------------------------------------------- drawing helpers
def new_figure(width: float, height: float, layout="constrained"):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig, eval_dir: Path, name: str, group: str) -> list:
    """figures/<name>_<group>.png and .pdf, each written under a temporary name and renamed."""
    from .rundir import atomic_path

    folder = Path(eval_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}_{group}.png", folder / f"{name}_{group}.pdf"]
    for path, kw in ((paths[0], dict(dpi=110)), (paths[1], {})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:], **kw)
    return paths


def class_colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]


def lighter(colour: str, amount: float = 0.55) -> tuple:
    """The colour mixed with white (amount 1: white)."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * amount for c in to_rgb(colour))


def loss_colour(loss: str) -> str:
    """Sup blue, SCL vermillion; any other loss one of the other Okabe-Ito colours (fixed by its name)."""
    if loss in LOSS_COLOURS:
        return LOSS_COLOURS[loss]
    rest = [c for c in OKABE_ITO if c not in LOSS_COLOURS.values()]
    return rest[zlib.crc32(str(loss).encode()) % len(rest)]


def loss_colours(loss: str):
    """(strong, light) colours of a loss."""
    return loss_colour(loss), lighter(loss_colour(loss))


def method_styles(methods) -> dict:
    """{method: (marker, line style)}, distinct within `methods`: the shipped methods keep theirs, every other name
    (a new method, a variant 'gmp [3fa2c1]') gets the next unused one of STYLE_POOL in sorted order, then
    marker/line combinations."""
    methods = list(dict.fromkeys(methods))
    styles = {m: METHOD_STYLES[m] for m in methods if m in METHOD_STYLES}
    used = set(styles.values())
    markers = [m for m, _ in STYLE_POOL]
    lines = [ls for _, ls in STYLE_POOL] + ["-", "--", ":"]
    candidates = STYLE_POOL + [(m, ls) for ls in lines for m in markers]
    for method in sorted(m for m in methods if m not in styles):
        styles[method] = next(c for c in candidates if c not in used)
        used.add(styles[method])
    return styles


def sparsity_colours(sparsities) -> dict:
    """{sparsity: colour}: dense black, pruned levels along viridis (dark = low, yellow = high)."""
    import matplotlib

    pruned = sorted(s for s in set(sparsities) if s > 0)
    cmap = matplotlib.colormaps["viridis"]
    colours = {s: cmap(0.1 + 0.8 * i / max(len(pruned) - 1, 1)) for i, s in enumerate(pruned)}
    colours.update({s: "#000000" for s in set(sparsities) if s <= 0})
    return colours


# ---------------------------------------------------------------- the figures
def umap_grid(eval_dir: Path, group: str, which: str = "first", colour: str = "true") -> list:
    """UMAP grid (paper Figs 1, 5): rows are sparsities (dense first), columns loss/method.

    The dense row shows each loss's dense population once, in the first column of its loss. Every pruned
    population's layout started from its dense population's and was rotated onto it (the eval's `aligned_to`),
    so a column compares like with like: a sample stays where it was unless pruning moved it. PIEs are drawn
    on top with a black edge (dense panels: the PIEs of any population compared with it).
    which: 'first' (each population's first model) or 'mean' (h averaged over its models).
    colour: 'true' (true class) or 'predicted' (the first model's prediction, or the modal label for 'mean')."""
    path = Path(eval_dir) / "figdata" / f"umap_{group}.csv"
    if not path.is_file():
        raise MissingData("UMAP was not computed (add umap to whatislost-eval --metrics)")
    coords = pd.read_csv(path)
    coords = coords[coords.which == which]
    if coords.empty:
        raise MissingData(f"no UMAP coordinates of kind '{which}' in {path.name}")
    by = "pred" if colour == "predicted" and "pred" in coords else "label"
    pops = coords.drop_duplicates("population")
    columns = pruned_pairs(pops) or figure_columns((loss, "dense") for loss in pops.loss.unique())
    sparsities = sorted({0.0, *pops.sparsity[pops.method != "dense"].astype(float)})
    n_classes = int(max(coords.label.max(), coords[by].max())) + 1
    names, colours = class_names(eval_dir, group, n_classes), np.array(class_colours(n_classes))
    first_of_loss = {}
    for j, (loss, _) in enumerate(columns):
        first_of_loss.setdefault(loss, j)
    aligned = "aligned_to" in coords and coords.aligned_to.fillna("").astype(str).str.len().gt(0).any()
    fig = new_figure(2.5 * len(columns) + 1.8, 2.5 * len(sparsities) + 0.6)
    axes = fig.subplots(len(sparsities), len(columns), squeeze=False)
    for i, s in enumerate(sparsities):
        for j, (loss, method) in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column_name(loss, method), fontsize=11)
            if j == 0:
                ax.set_ylabel("dense" if s == 0 else f"{pct(s)}% sparse", fontsize=11, fontweight="bold")
            if s == 0 and j != first_of_loss[loss]:
                for side in ax.spines.values():
                    side.set_visible(False)
                ax.text(0.5, 0.5, f"{column_name(loss, 'dense')}:\nas in the first\n{loss_name(loss)} column",
                        ha="center", va="center", color="grey", fontsize=8, transform=ax.transAxes)
                continue
            label = population_label(pops, loss, method, s)
            points = coords[coords.population == label]
            if points.empty:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", color="grey", transform=ax.transAxes)
                continue
            pie = points.pie.eq(1).to_numpy() if "pie" in points else np.zeros(len(points), bool)
            size = max(0.5, min(6.0, 2500 / len(points)))
            # rasterized: a 10,000-point scatter per panel stays small in the PDF
            ax.scatter(points.x[~pie], points.y[~pie], c=colours[points[by].to_numpy()[~pie]], s=size, linewidths=0,
                       alpha=0.45 if pie.any() else 1.0, rasterized=True)
            if pie.any():
                ax.scatter(points.x[pie], points.y[pie], c=colours[points[by].to_numpy()[pie]], s=3 * size + 4,
                           edgecolors="black", linewidths=0.5, rasterized=True)
            if s == 0:
                ax.set_xlabel(f"{column_name(loss, 'dense')} ({int(pie.sum())} PIEs of its populations)", fontsize=8)
            elif pie.any():
                ax.set_xlabel(f"{int(pie.sum())} PIEs", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colours[c], label=names[c]) for c in range(n_classes)]
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="black", label="PIE"))
    fig.legend(handles=handles, loc="outside right center", frameon=False,
               title="predicted class" if by == "pred" else "true class")
    fig.suptitle(f"UMAP of the representation h, {group}\n{'first model' if which == 'first' else 'mean over models'}; "
                 f"colour: {'predicted' if by == 'pred' else 'true'} class"
                 + ("; pruned layouts aligned to their dense population's" if aligned else ""))
    return save(fig, eval_dir, "umap", group)


def _whole(value, default: int = 1) -> int:
    """A positive whole number from a table cell (NaN, missing or < 1: default)."""
    try:
        return int(value) if value is not None and not pd.isna(value) and int(value) >= 1 else default
    except (TypeError, ValueError):
        return default


def _lattice_jitter(values: pd.Series, step: float, rng) -> np.ndarray:
    """Uniform jitter of ±0.4 lattice steps: PD-Scores are means of whole depths over a few models."""
    return values.to_numpy() + rng.uniform(-0.4 * step, 0.4 * step, len(values))


def dense_vs_pruned(eval_dir: Path, group: str, score: str, sparsity=None) -> list:
    """Per-sample score of the dense population (x) against each pruned population (y) at one sparsity.

    score: 'q' (Q-Score, paper Fig 2) or 'pd' (PD-Score, Fig 3). One panel per loss/method, every panel on the
    same axis range; PIEs drawn as black crosses on top; sparsity defaults to the highest one scored. PD-Scores
    (means of whole depths over the depth models) are jittered off their lattice, and a second row shows their
    histograms, PIEs and non-PIEs apart."""
    title, name = {"q": ("Q-Score", "qscore"), "pd": ("PD-Score", "pdscore")}[score]
    samples = read_per_sample(eval_dir, group)
    pops = load_populations(eval_dir)
    pops = pops[pops.group == group]
    panels = []  # (loss, method, sparsity, pruned row, dense row)
    for r in pops[pops.method != "dense"].itertuples():
        dense = lookup(pops, r.loss, "dense", 0)
        if dense is not None and f"{r.population}:{score}" in samples and f"{dense.population}:{score}" in samples:
            panels.append((r.loss, r.method, float(r.sparsity), r, dense))
    if not panels:
        why = "prediction depth was not computed (add depth to --metrics)" if score == "pd" else \
            "Q-Score was not computed (add qscore to --metrics)"
        raise MissingData(f"no pruned population with a dense counterpart has {title}s: {why}")
    s = pick_sparsity([p[2] for p in panels], sparsity, max)
    panels = {(p[0], p[1]): p for p in panels if abs(p[2] - s) < 1e-6}
    order = figure_columns(panels)
    values = [samples[f"{p[k].population}:{score}"] for p in panels.values() for k in (3, 4)]
    lo, hi = float(min(v.min() for v in values)), float(max(v.max() for v in values))  # one range for every panel
    pad = 0.05 * (hi - lo or 1)
    lattice = score == "pd"
    fig = new_figure(3.4 * len(order) + 0.4, 6.6 if lattice else 4.6)
    axes = fig.subplots(2 if lattice else 1, len(order), squeeze=False, height_ratios=[2.4, 1] if lattice else None)
    rng = np.random.default_rng(0)
    for j, pair in enumerate(order):
        loss, method, _, row, dense = panels[pair]
        ax = axes[0, j]
        x, y = samples[f"{dense.population}:{score}"], samples[f"{row.population}:{score}"]
        pie = samples[f"{row.population}:pie"].eq(1) if f"{row.population}:pie" in samples else \
            pd.Series(False, index=samples.index)
        if lattice:
            k_dense, k_pruned = (_whole(getattr(r, "depth_models", None)) for r in (dense, row))
            x, y = (pd.Series(_lattice_jitter(v, 1 / k, rng), index=v.index) for v, k in ((x, k_dense), (y, k_pruned)))
            probes = getattr(row, "n_probes", None)
            span = f"1-{int(probes)}, " if probes is not None and not pd.isna(probes) else ""
            xlabel = f"PD-Score, dense ({span}mean of {k_dense} models)"
            ylabel = f"PD-Score, {pct(s)}% sparse ({span}mean of {k_pruned})"
        else:
            xlabel, ylabel = f"{title}, dense", f"{title}, {pct(s)}% sparse"
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, zorder=1)
        ax.scatter(x[~pie], y[~pie], s=8, color=loss_colour(loss), alpha=0.3, linewidths=0, rasterized=True,
                   label=f"non-PIE ({int((~pie).sum())})", zorder=2)
        ax.scatter(x[pie], y[pie], s=16, color=PIE_COLOUR, marker=PIE_MARKER, linewidths=0.9, rasterized=True,
                   label=f"PIE ({int(pie.sum())})", zorder=3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_title(column_name(loss, method))
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.legend(loc="upper left", fontsize=8, markerscale=1.5)
        means = "" if lattice else _mean_ci_text(dense, row, "q")
        if means:  # between the title and the panel, where no point can sit
            ax.set_title(column_name(loss, method), pad=6 + 10 * (means.count("\n") + 1))
            ax.text(0.5, 1.015, means, transform=ax.transAxes, ha="center", va="bottom", fontsize=7.5, linespacing=1.15)
        if lattice:
            hist = axes[1, j]
            raw = samples[f"{row.population}:{score}"]
            bins = np.arange(lo - 0.5 / k_pruned, hi + 1 / k_pruned, 1 / k_pruned)
            hist.hist(raw[~pie], bins=bins, density=True, color=loss_colour(loss), alpha=0.45, label="non-PIE")
            hist.hist(raw[pie], bins=bins, density=True, histtype="step", color=PIE_COLOUR, lw=1.4, label="PIE")
            for part, colour, style in (("pd_nonpie", loss_colour(loss), "-"), ("pd_pie", PIE_COLOUR, "--")):
                mean, low, high = (getattr(row, f"{part}_{s}", None) for s in ("mean", "ci_low", "ci_high"))
                if mean is not None and not pd.isna(mean):  # the mean and its 95% interval (models resampled)
                    hist.axvline(mean, color=colour, ls=style, lw=1.2,
                                 label=f"mean {mean:.2f}" + (f" [{low:.2f}, {high:.2f}]" if not pd.isna(low) else ""))
                    if low is not None and not pd.isna(low):
                        hist.axvspan(low, high, color=colour, alpha=0.25, lw=0)
            hist.set_xlim(lo - pad, hi + pad)
            hist.set_xlabel(f"PD-Score, {pct(s)}% sparse", fontsize=9)
            hist.set_ylabel("density", fontsize=9)
            hist.legend(fontsize=7, title="mean [95% CI] dashed: PIEs", title_fontsize=7)
    fig.suptitle(f"{title} per test sample: dense vs {pct(s)}% sparse (population means"
                 + ("; jittered ±0.4 of a lattice step" if lattice else "") + f"), {group}")
    return save(fig, eval_dir, name, group)


def _mean_ci_text(dense, row, name: str) -> str:
    """'mean [95% CI]' of the dense and the pruned population (populations.csv), one line each."""
    lines = []
    for who, r in (("dense", dense), ("sparse", row)):
        mean, low, high = (getattr(r, f"{name}_{s}", None) for s in ("mean", "ci_low", "ci_high"))
        if mean is not None and not pd.isna(mean):
            ci = f" [{low:.3f}, {high:.3f}]" if low is not None and not pd.isna(low) else ""
            lines.append(f"{who} {mean:.3f}{ci}")
    return ("mean [95% CI]: " + "\n".join(lines)) if lines else ""


def qscore_scatter(eval_dir: Path, group: str, sparsity=None) -> list:
    """Q-Score of dense vs pruned models per sample (paper Fig 2)."""
    return dense_vs_pruned(eval_dir, group, "q", sparsity)


def pdscore_scatter(eval_dir: Path, group: str, sparsity=None) -> list:
    """PD-Score of dense vs pruned models per sample (paper Fig 3)."""
    return dense_vs_pruned(eval_dir, group, "pd", sparsity)


def pies_per_class(eval_dir: Path, group: str) -> list:
    """PIEs per true class (paper Figs 4, 7): rows are sparsities, columns loss/method.

    Solid: PIEs shared by Sup and SCL (same method and sparsity); light and hatched: PIEs unique to this
    loss. A column without a counterpart of the other loss is all unique, and says so."""
    tables = Path(eval_dir) / "tables"
    per_class = pd.read_csv(tables / "pie_per_class.csv")
    per_class = per_class[per_class.dataset + "-" + per_class.model == group]
    if per_class.empty:
        raise MissingData("no PIEs were computed (PIEs need pie in --metrics, a dense population and 2+ models each)")
    overlap = pd.read_csv(tables / "pie_overlap.csv")
    overlap = overlap[overlap.dataset + "-" + overlap.model == group]
    columns = figure_columns(zip(per_class.loss, per_class.method))
    sparsities = sorted(per_class.sparsity.unique())
    names = per_class.drop_duplicates("cls").sort_values("cls").class_name.astype(str).tolist()
    fig = new_figure(max(2.8, 0.28 * len(names) + 1.2) * len(columns), 2.4 * len(sparsities) + 0.8)
    axes = fig.subplots(len(sparsities), len(columns), squeeze=False, sharey="row")
    for i, s in enumerate(sparsities):
        for j, (loss, method) in enumerate(columns):
            ax = axes[i, j]
            counts = per_class[(per_class.loss == loss) & (per_class.method == method) & (per_class.sparsity == s)]
            both = overlap[(overlap.method == method) & (overlap.sparsity == s)].sort_values("cls")
            title = f"{column_name(loss, method)}, {pct(s)}%"
            if counts.empty:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", color="grey", transform=ax.transAxes)
                ax.set_title(title, fontsize=10)
                ax.set_xticks([])
                continue
            total = counts.sort_values("cls")["count"].to_numpy()
            shared = both.shared.to_numpy() if len(both) == len(total) else np.zeros_like(total)
            strong, light = loss_colours(loss)
            x = np.arange(len(total))
            ax.bar(x, shared, color=strong, width=0.8)
            ax.bar(x, total - shared, bottom=shared, color=light, edgecolor=strong, hatch="///", linewidth=0.5, width=0.8)
            title += f": {int(total.sum())} PIEs"
            if len(both) != len(total):
                title += f"\n(no {'SCL' if loss == 'ce' else 'Sup'} counterpart: all unique)"
            ax.set_title(title, fontsize=10)
            ax.set_xticks(x, names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=8)
            if j == 0:
                ax.set_ylabel("PIEs")
    from matplotlib.patches import Patch

    handles = []
    for loss in sorted(set(per_class.loss), key=lambda l: (l != "ce", l)):
        strong, light = loss_colours(loss)
        other = "SCL" if loss == "ce" else "Sup"
        handles += [Patch(color=strong, label=f"{loss_name(loss)}, shared with {other}"),
                    Patch(facecolor=light, edgecolor=strong, hatch="///", label=f"{loss_name(loss)}, unique")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle(f"PIEs per true class, {group}")
    return save(fig, eval_dir, "pie_classes", group)


GALLERY_KINDS = ("sparse right, dense wrong", "dense right, sparse wrong", "both wrong")


def gallery_rows(samples: pd.DataFrame, group_pops: pd.DataFrame, sparsity=None, per_row: int = 8):
    """Which PIEs the gallery shows: (sparsity, [(row title, [(sample id, true, dense label, sparse label)])]).

    Per pruned population at the sparsity (default the lowest, as the paper's Fig 6 shows 30%), three rows:
    PIEs it classifies right and its dense population wrong, the reverse, and PIEs both get wrong (with different
    labels); the first `per_row` of each by sample id. The title says how many of how many are shown. Labels are
    modal labels (class ids)."""
    samples = samples.set_index("sample_id", drop=False)
    pops = group_pops[[f"{p}:pie" in samples for p in group_pops.population]]
    if pops.empty:
        raise MissingData("no PIEs were computed, so there are no PIE images")
    s = pick_sparsity(pops.sparsity, sparsity, min)
    pops = pops[same_sparsity(pops.sparsity, s)].set_index(["loss", "method"])
    rows = []
    for loss, method in figure_columns(pops.index):
        label = pops.loc[(loss, method), "population"]
        dense = samples[f"{population_label(group_pops, loss, 'dense', 0)}:modal"]
        sparse, pie, truth = samples[f"{label}:modal"], samples[f"{label}:pie"].eq(1), samples.true_label
        keeps = (pie & (sparse == truth), pie & (dense == truth), pie & (sparse != truth) & (dense != truth))
        for what, keep in zip(GALLERY_KINDS, keeps):
            ids = samples.sample_id[keep].head(per_row)
            rows.append((f"{column_name(loss, method)} {pct(s)}%\n{what}\n{len(ids)} of {int(keep.sum())} shown",
                         [(int(i), int(truth[i]), int(dense[i]), int(sparse[i])) for i in ids]))
    return s, rows


def pie_gallery(eval_dir: Path, group: str, sparsity=None, per_row: int = 8) -> list:
    """PIE images (paper Fig 6), chosen by `gallery_rows`, each captioned with its true label and the dense and
    the sparse population's modal labels."""
    path = Path(eval_dir) / "figdata" / f"pie_images_{group}.npz"
    if not path.is_file():
        raise MissingData(f"{path.name} is missing")
    npz = np.load(path)
    index = {int(i): k for k, i in enumerate(npz["sample_id"])}  # the npz holds the images of PIEs only
    images, names = npz["images"], [str(c) for c in npz["classes"]]

    def name(c):
        text = names[c] if c < len(names) else str(c)
        return text if len(text) <= 14 else text[:13] + "…"

    pops = load_populations(eval_dir)
    s, chosen = gallery_rows(read_per_sample(eval_dir, group), pops[pops.group == group], sparsity, per_row)
    rows = [(title, [(images[index[i]], f"true: {name(t)}\ndense: {name(u)}\nsparse: {name(v)}")
                     for i, t, u, v in cells if i in index]) for title, cells in chosen]
    left, top, bottom = 2.5, 1.0, 0.8
    width, height = 1.7 * per_row + left, 2.3 * len(rows) + top + bottom
    fig = new_figure(width, height, layout=None)  # a fixed grid: constrained layout costs seconds on many axes
    fig.subplots_adjust(left=left / width, right=0.99, bottom=bottom / height, top=1 - top / height, wspace=0.12,
                        hspace=0.8)
    axes = fig.subplots(len(rows), per_row, squeeze=False)
    for r, (title, cells) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(c < len(cells))
            if c < len(cells):
                image, caption = cells[c]
                if image.shape[0] == 1:
                    ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
                ax.set_xlabel(caption, fontsize=10, linespacing=1.1)
            elif c == 0:
                ax.text(0.05, 0.5, "none", color="grey", fontsize=10, transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(title, fontsize=11, rotation=0, ha="right", va="center", labelpad=10)
    fig.suptitle(f"PIEs at {pct(s)}% sparsity, {group}\ntrue: true label; dense / sparse: modal label (the class most "
                 "models predict) of the dense / the pruned population", fontsize=12)
    return save(fig, eval_dir, "pie_gallery", group)


def _errors(frame: pd.DataFrame, name: str, std: bool):
    """Error bar lengths below and above the mean: its 95% CI when the eval wrote one, else (std=True) ±std."""
    low, high = f"{name}_ci_low", f"{name}_ci_high"
    mean = frame[f"{name}_mean"] if f"{name}_mean" in frame else frame[name]
    if low in frame and frame[low].notna().any():
        return np.vstack([(mean - frame[low]).clip(lower=0).fillna(0), (frame[high] - mean).clip(lower=0).fillna(0)]), True
    if std and f"{name}_std" in frame:
        return frame[f"{name}_std"].fillna(0).to_numpy(), False
    return None, False


def accuracy_and_pies(eval_dir: Path, group: str) -> list:
    """Test accuracy and PIE count against sparsity, one line per loss/method, each from its loss's dense
    population (0%: no PIEs, by definition). Error bars: 95% bootstrap intervals (accuracy: models resampled;
    PIEs: the models of both populations); hollow markers: the PIE count under the other tie rule."""
    pops = load_populations(eval_dir)
    pops = pops[pops.group == group]
    columns = pruned_pairs(pops) or figure_columns((loss, "dense") for loss in pops.loss.unique())
    sparsities = sorted({0.0, *pops.sparsity.astype(float)})
    where = {s: i for i, s in enumerate(sparsities)}  # evenly spaced: 90, 95, 99 stay apart
    has_pies = "pie_count" in pops and pops.pie_count.notna().any()
    n_test = int(pops.n_test.max()) if "n_test" in pops and pops.n_test.notna().any() else None
    styles = method_styles(m for _, m in columns)
    fig = new_figure(11.5 if has_pies else 6, 4.4)
    axes = fig.subplots(1, 2 if has_pies else 1, squeeze=False)[0]
    ci_shown = False
    for j, (loss, method) in enumerate(columns):
        dodge = 0.08 * (j - (len(columns) - 1) / 2)  # error bars of lines at one sparsity side by side
        line = pops[(pops.loss == loss) & pops.method.isin(["dense", method])].sort_values("sparsity")
        marker, style = styles[method]
        kw = dict(color=loss_colour(loss), marker=marker, ls=style, label=column_name(loss, method))
        yerr, ci = _errors(line, "acc", std=True)
        ci_shown |= ci
        axes[0].errorbar(line.sparsity.astype(float).map(where) + dodge, line.acc_mean, yerr=yerr, capsize=3, **kw)
        if has_pies:
            pruned = line[line.pie_count.notna()]
            dense = line[line.method == "dense"].head(1)
            x = pd.concat([dense.sparsity, pruned.sparsity]).astype(float).map(where) + dodge
            counts = pd.concat([pd.Series(0.0, index=dense.index), pruned.pie_count])
            errs, _ = _errors(pruned, "pie_count", std=False)
            if errs is not None:
                errs = np.hstack([np.zeros((2, len(dense))), errs])
            axes[1].errorbar(x, counts, yerr=errs, capsize=3, **kw)
            if "pie_count_other" in pruned:
                axes[1].plot(pruned.sparsity.astype(float).map(where) + dodge, pruned.pie_count_other, ls="",
                             marker=marker, markerfacecolor="none", markeredgecolor=loss_colour(loss), markersize=8)
    acc_label = "test accuracy % (mean; bars: 95% CI over models)" if ci_shown else \
        "test accuracy % (mean ± std over models)"
    pie_label = f"PIEs (of {n_test} test images)" if n_test else "PIEs"
    for ax, ylabel in zip(axes, (acc_label, pie_label)):
        ax.set_xticks(range(len(sparsities)), [pct(s) for s in sparsities])
        ax.set_xlabel("sparsity %")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_pies:
        from matplotlib.lines import Line2D

        top = pops[[c for c in ("pie_count", "pie_count_ci_high", "pie_count_other") if c in pops]].max().max()
        axes[1].set_ylim(0, 1.35 * top)  # a count: zero is meaningful; headroom for the legend
        handles, labels = axes[1].get_legend_handles_labels()
        if "pie_count_other" in pops:
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="grey"))
            labels.append("other tie rule")
        axes[1].legend(handles, labels, fontsize=8)
        axes[1].set_title("bars: 95% CI (models of both populations resampled)", fontsize=9)
    fig.suptitle(f"Accuracy and PIEs against sparsity, {group}" + (f" ({n_test} test images)" if n_test else ""))
    return save(fig, eval_dir, "acc_pies", group)


TRAINING_META = ["population", "seed", "run", "stage", "epoch", "_loss", "_method", "_target"]


def _stage_offsets(frame: pd.DataFrame) -> tuple[dict, list]:
    """{stage: epochs before it} in the order the stages ran, and [(stage, first epoch, last epoch)]."""
    offsets, spans, start = {}, [], 0
    for stage in dict.fromkeys(frame.stage):
        last = int(frame.epoch[frame.stage == stage].max())
        offsets[stage] = start
        spans.append((stage, start, start + last))
        start += last
    return offsets, spans


def training_curves(eval_dir: Path, group: str) -> list:
    """Loss, accuracy, learning rate and sparsity per epoch (from every run's metrics.csv), one row per loss/method
    (dense first), one line per population (colour: sparsity), the mean over its runs with their range shaded;
    the stages (ce | supcon, linear | finetune) follow each other along the x axis."""
    curves = read_figdata(eval_dir, "training", group, "the eval found no metrics.csv in the runs")
    pairs = set(zip(curves._loss, curves._method))
    families = figure_columns({p for p in pairs if p[1] == "dense"}) + figure_columns({p for p in pairs if p[1] != "dense"})
    colours = sparsity_colours(curves._target.astype(float))
    panels = [("loss", "loss"), ("accuracy", "accuracy (train —, test - -)"), ("lr", "learning rate"),
              ("sparsity", "sparsity %")]
    width, height = 15.0, 2.6 * len(families) + 1.0
    fig = new_figure(width, height, layout=None)  # fixed margins: constrained layout costs seconds on many axes
    fig.subplots_adjust(left=0.7 / width, right=1 - 1.7 / width, bottom=0.6 / height, top=1 - 0.75 / height,
                        wspace=0.32, hspace=0.5)
    axes = fig.subplots(len(families), len(panels), squeeze=False, sharex="row")
    for i, (loss, method) in enumerate(families):
        family = curves[(curves._loss == loss) & (curves._method == method)].sort_values("_target", kind="stable")
        offsets, spans = _stage_offsets(family)
        for population, runs in family.groupby("population", sort=False):
            s = float(runs._target.iloc[0])
            runs = runs.assign(x=runs.epoch + runs.stage.map(offsets))
            by_x = runs.groupby("x", sort=True)
            for j, (panel, _) in enumerate(panels):
                ax = axes[i, j]
                series = [("train_acc", "-"), ("test_acc", "--")] if panel == "accuracy" else [(panel, "-")]
                for column, style in series:
                    if column not in runs or runs[column].isna().all():
                        continue
                    scale = 100.0 if column in ("train_acc", "test_acc", "sparsity") else 1.0
                    mean, low, high = (scale * getattr(by_x[column], f)() for f in ("mean", "min", "max"))
                    ax.plot(mean.index, mean.to_numpy(), color=colours[s], ls=style, lw=1.2,
                            label=population if (panel, column) == ("loss", "loss") else None)
                    if runs.seed.nunique() > 1:
                        ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=colours[s], alpha=0.15,
                                        linewidth=0)
        for j, (panel, ylabel) in enumerate(panels):
            ax = axes[i, j]
            for stage, start, end in spans:
                if start > 0:
                    ax.axvline(start + 0.5, color="grey", ls=":", lw=0.8)
                if i == 0 or j == 0:
                    ax.text((start + end + 1) / 2, 1.0, stage, transform=ax.get_xaxis_transform(), ha="center",
                            va="bottom", fontsize=7, color="grey")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.grid(alpha=0.3)
            if panel == "sparsity":
                ax.set_ylim(-3, max(10.0, ax.get_ylim()[1] + 3))
            if i == len(families) - 1:
                ax.set_xlabel("epoch (stages one after the other)", fontsize=9)
        axes[i, 0].set_title(column_name(loss, method), loc="left", fontsize=11, pad=11, fontweight="bold")
        axes[i, -1].legend(*axes[i, 0].get_legend_handles_labels(), fontsize=7, loc="center left",
                           bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"Training curves (mean over each population's runs; shaded: their range), {group}")
    return save(fig, eval_dir, "training_curves", group)


def short_tensor(name: str) -> str:
    """'encoder.blocks.1.conv_shortcut.weight' -> 'blocks.1.conv_shortcut'."""
    return name.removeprefix("encoder.").removesuffix(".weight")


def layer_sparsity(eval_dir: Path, group: str) -> list:
    """Sparsity of every pruned tensor (layer_sparsity.csv of each population's first run), one row per pruned
    loss/method: at the end of training per tensor, one line per target sparsity (dashed: the target); and per
    epoch for the family's highest sparsity, one line per tensor (colour: depth), black: the whole model
    (metrics.csv)."""
    layers = read_figdata(eval_dir, "layer_sparsity", group, "the eval found no layer_sparsity.csv in the runs")
    layers = layers[layers._method != "dense"]
    tensors = [c for c in layers.columns if c not in TRAINING_META]
    if layers.empty or not tensors:
        raise MissingData("no pruned population has a per-layer sparsity log")
    curves_path = Path(eval_dir) / "figdata" / f"training_{group}.csv"
    overall = pd.read_csv(curves_path) if curves_path.is_file() else None
    families = figure_columns(set(zip(layers._loss, layers._method)))
    colours = sparsity_colours(layers._target.astype(float))
    import matplotlib

    depth = matplotlib.colormaps["cividis"]
    longest = max(len(short_tensor(t)) for t in tensors)
    width, row = 14.0, 2.2 + 0.075 * longest  # room for the tensor names under each row
    height = row * len(families) + 0.9
    fig = new_figure(width, height, layout=None)  # fixed margins: constrained layout costs seconds on many axes
    fig.subplots_adjust(left=0.7 / width, right=0.99, bottom=(row - 1.9) / height, top=1 - 0.7 / height, wspace=0.15,
                        hspace=(row - 1.9) / 1.9 + 0.15)
    axes = fig.subplots(len(families), 2, squeeze=False, width_ratios=[1.3, 1])
    x = np.arange(len(tensors))
    for i, (loss, method) in enumerate(families):
        family = layers[(layers._loss == loss) & (layers._method == method)].sort_values("_target", kind="stable")
        ax = axes[i, 0]
        for population, run in family.groupby("population", sort=False):
            s = float(run._target.iloc[0])
            final = run[tensors].iloc[-1].astype(float) * 100
            ax.plot(x, final.to_numpy(), color=colours[s], marker="o", ms=3, lw=1, label=population)
            ax.axhline(s, color=colours[s], ls="--", lw=0.7)
        ax.set_xticks(x, [short_tensor(t) for t in tensors], rotation=90, fontsize=7)
        ax.set_ylabel("sparsity % (end of training)", fontsize=9)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.set_title(column_name(loss, method), loc="left", fontsize=11)
        ax.legend(fontsize=7, ncols=2)
        ax = axes[i, 1]
        top = family[family._target == family._target.max()]
        top = top[top.run == top.run.iloc[0]]
        offsets, spans = _stage_offsets(top)
        epochs = top.epoch + top.stage.map(offsets)
        for k, tensor in enumerate(tensors):
            ax.plot(epochs, top[tensor].astype(float) * 100, color=depth(k / max(len(tensors) - 1, 1)), lw=0.9)
        if overall is not None:
            mine = overall[(overall.run == top.run.iloc[0]) & (overall.population == top.population.iloc[0])]
            if not mine.empty:
                ax.plot(mine.epoch + mine.stage.map(offsets), mine.sparsity * 100, color="black", lw=2,
                        label="whole model")
                ax.legend(fontsize=7, loc="lower right")
        for stage, start, end in spans:
            if start > 0:
                ax.axvline(start + 0.5, color="grey", ls=":", lw=0.8)
            ax.text((start + end + 1) / 2, 1.0, stage, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7, color="grey")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.set_ylabel("sparsity %", fontsize=9)
        ax.set_xlabel(f"epoch: {top.population.iloc[0]}, run {top.run.iloc[0]} (lines: tensors, dark = first)",
                      fontsize=8)
    fig.suptitle(f"Sparsity of every pruned tensor, {group}")
    return save(fig, eval_dir, "layer_sparsity", group)


def cka_by_probe(eval_dir: Path, group: str) -> list:
    """Linear CKA between each pruned population's models and its dense reference's against probe depth
    (tables/cka.csv), one panel per sparsity, one line per pruned population (colour: loss; marker and line style:
    method) with its 95% interval as a band; thin dotted lines: each dense population's seed-to-seed CKA (pairs of
    its own models), the similarity two dense models already have."""
    path = Path(eval_dir) / "tables" / "cka.csv"
    if not path.is_file():
        raise MissingData("linear CKA was not computed (add cka to whatislost-eval --metrics)")
    table = pd.read_csv(path)
    table = table[table.group == group]
    pruned = table[table.method != "dense"]
    if pruned.empty:
        raise MissingData("no pruned population with a scored dense reference has CKA values")
    baseline = table[table.method == "dense"]
    sparsities = sorted(pruned.sparsity.astype(float).unique())
    columns = figure_columns(zip(pruned.loss, pruned.method))
    styles = method_styles(m for _, m in columns)
    fig = new_figure(max(5.0, 4.4 * len(sparsities)) + 2.6, 4.6)
    axes = fig.subplots(1, len(sparsities), squeeze=False, sharey=True)[0]
    lowest = 1.0
    for ax, s in zip(axes, sparsities):
        for loss, rows in baseline.groupby("loss", sort=True):
            rows = rows.sort_values("probe")
            ax.plot(rows.probe, rows.cka_mean, color=lighter(loss_colour(loss), 0.25), ls=":", lw=1.4,
                    label=f"{column_name(loss, 'dense')}, seed to seed")
            lowest = min(lowest, float(rows.cka_mean.min()))
        for loss, method in columns:
            rows = pruned[(pruned.loss == loss) & (pruned.method == method) & same_sparsity(pruned.sparsity, s)]
            if rows.empty:
                continue
            rows = rows.sort_values("probe")
            marker, style = styles[method]
            ax.plot(rows.probe, rows.cka_mean, color=loss_colour(loss), marker=marker, ls=style, ms=4,
                    label=column_name(loss, method))
            if rows.cka_ci_low.notna().any():
                ax.fill_between(rows.probe, rows.cka_ci_low, rows.cka_ci_high, color=loss_colour(loss), alpha=0.18,
                                linewidth=0)
            lowest = min(lowest, float(rows[["cka_mean", "cka_ci_low"]].min().min()))
        probes = table.drop_duplicates("probe").sort_values("probe")
        step = max(1, len(probes) // 16)  # at most 16 tick labels
        ticks = probes.iloc[::step]
        ax.set_xticks(ticks.probe, [f"{int(p)}\n{int(d)}" for p, d in zip(ticks.probe, ticks.probe_dim)], fontsize=8)
        ax.set_xlabel("probe, input → output (below: its width)", fontsize=9)
        ax.set_title(f"{pct(s)}% sparse")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("linear CKA with the dense population\n(mean over model pairs; band: 95% CI)", fontsize=9)
    axes[0].set_ylim(max(0.0, lowest - 0.05), 1.01)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8, frameon=False)
    n = table.n_samples.max() if "n_samples" in table else None
    fig.suptitle(f"Representation similarity of pruned and dense models per probe (linear CKA), {group}"
                 + (f"\n{int(n)} test images, probes: {table.probes.iloc[0]}" if n is not None and not pd.isna(n) else ""))
    return save(fig, eval_dir, "cka", group)


# (name, title, function, caption) in the order the report shows them
FIGURES = [
    ("acc_pies", "Accuracy and PIEs against sparsity", accuracy_and_pies,
     "Left: test accuracy, mean over each population's models; bars: 95% bootstrap interval (models resampled). "
     "Right: PIE count (test samples whose modal label differs from the dense population's; 0 at 0% by "
     "definition) with its 95% bootstrap interval (the models of both populations resampled); hollow markers: the "
     "count under the other tie rule (--tie-break). Colour: loss; marker and line style: method. "
     "Source: tables/populations.csv."),
    ("training_curves", "Training curves", training_curves,
     "Loss, accuracy (train solid, test dashed, where logged), learning rate and model sparsity per epoch, the "
     "training stages one after the other (dotted lines). One row per loss/method, one line per population "
     "(colour: sparsity, dense black): the mean over its runs, shaded: their range. "
     "Source: figdata/training_<group>.csv (each run's metrics.csv)."),
    ("layer_sparsity", "Per-layer sparsity", layer_sparsity,
     "Left: sparsity of every pruned tensor at the end of training, one line per target sparsity (dashed: the "
     "target). Right: the same per epoch for the highest sparsity (dark: tensors near the input), black: the whole "
     "model. Source: figdata/layer_sparsity_<group>.csv (each population's first run), figdata/training_<group>.csv."),
    ("umap", "UMAP of the representation (paper Figs 1, 5)", umap_grid,
     "Rows: sparsity (dense first: each loss's dense population once). Columns: loss/method. Points: test samples "
     "in one model's representation (or the population mean; the title says which), coloured by true class (or "
     "predicted class: whatislost-report --umap-colour predicted). Each pruned layout starts from its dense "
     "population's and is rotated and scaled onto it, so a column compares like with like. Black-edged points: "
     "PIEs (dense row: PIEs of any population compared with it). Source: figdata/umap_<group>.csv."),
    ("qscore", "Q-Score, dense vs pruned (paper Fig 2)", qscore_scatter,
     "Per test sample, Q-Score averaged over the dense population's models (x) and the pruned population's (y), "
     "at one sparsity (default the highest; the title names it), every panel on the same axes; grey: identity "
     "line; black crosses: PIEs. Above each panel: each population's mean Q-Score with its 95% bootstrap interval "
     "(models resampled). Source: tables/per_sample_<group>.csv, tables/populations.csv."),
    ("pdscore", "PD-Score, dense vs pruned (paper Fig 3)", pdscore_scatter,
     "Per test sample, prediction depth (1 to the number of probes, in the axis labels) averaged over the dense "
     "population's depth models (x) and the pruned population's (y), at one sparsity (default the highest), "
     "jittered off the lattice such means lie on; grey: identity line; black crosses: PIEs. Below: histograms of "
     "the pruned population's PD-Scores, PIEs and non-PIEs apart, with their means (PIEs dashed) and 95% bootstrap "
     "intervals (bands; depth models resampled). Source: tables/per_sample_<group>.csv, tables/populations.csv."),
    ("pie_classes", "PIEs per class (paper Figs 4, 7)", pies_per_class,
     "PIE count per true class, one row per sparsity. Solid: PIEs shared by Sup and SCL with the same method and "
     "sparsity; light and hatched: PIEs unique to the loss. "
     "Source: tables/pie_per_class.csv, tables/pie_overlap.csv."),
    ("pie_gallery", "PIE gallery (paper Fig 6)", pie_gallery,
     "Test images, at one sparsity (default the lowest, as in the paper): PIEs the pruned population classifies "
     "right and the dense one wrong, the reverse, and PIEs both get wrong (the first by sample id; each row says "
     "how many of how many). Under each image: its true label and the modal labels of the dense and the pruned "
     "population. Source: figdata/pie_images_<group>.npz, tables/per_sample_<group>.csv."),
    ("cka", "Representation similarity, dense vs pruned (linear CKA)", cka_by_probe,
     "Linear CKA (Kornblith et al. 2019; 1: the same representation up to rotation and scale) between the pooled "
     "representation at each probe (the prediction-depth probes, input to output; the tick gives its width) of every "
     "model of a pruned population and every model of its dense reference, on the same fixed test images; lines: "
     "the mean over the model pairs, bands: 95% bootstrap intervals (the models of both populations resampled). "
     "One panel per sparsity; colour: loss, marker and line style: method. Dotted: each dense population's CKA "
     "between its own models (seed to seed), the similarity retraining alone leaves. Beyond the paper. "
     "Source: tables/cka.csv."),
]


def draw_figures(eval_dir: Path, scatter_sparsity=None, gallery_sparsity=None, umap_which: str = "first",
                 umap_colour: str = "true") -> list:
    """Draw every figure for every group; return one record per (group, figure):
    dict(group, name, title, caption, paths), plus missing=reason for a figure the eval lacks data for.

    scatter_sparsity: sparsity of the Q/PD-Score scatters (default the highest); gallery_sparsity:
    of the PIE gallery (default the lowest); umap_which: 'first' model or 'mean' representation;
    umap_colour: 'true' or 'predicted' class."""
    import matplotlib
    from tqdm import tqdm

    options = {"qscore": dict(sparsity=scatter_sparsity), "pdscore": dict(sparsity=scatter_sparsity),
               "pie_gallery": dict(sparsity=gallery_sparsity), "umap": dict(which=umap_which, colour=umap_colour)}
    records = []
    todo = [(group, figure) for group in groups(eval_dir) for figure in FIGURES]
    bar = tqdm(todo, desc="whatislost-report: figures", unit="figure", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)  # shown on a terminal only
    for group, (name, title, draw, caption) in bar:
        record = dict(group=group, name=name, title=title, caption=caption, paths=[])
        try:
            # names from data (classes, folders, methods) are shown as written: '$' is not mathtext
            with matplotlib.rc_context({"text.parse_math": False}):
                record["paths"] = draw(Path(eval_dir), group, **options.get(name, {}))
        except MissingData as why:
            record["missing"] = str(why)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            record["missing"] = f"an input table cannot be read (truncated or damaged?): {str(err).strip()}"
        records.append(record)
    return records
