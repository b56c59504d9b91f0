"""Figures stage: the paper's figures drawn from an eval folder (whatislost-eval output).

Nothing is recomputed: every figure reads only the eval folder's CSV and NPZ files. One
function per figure and (dataset, model) group; each writes figures/<name>_<group>.png and
.pdf and returns the written paths. When the eval did not produce a figure's input (no
UMAP, no prediction depth, a single-model population without PIEs) the function raises
`MissingData` with the reason, which the report shows in the figure's place.

    umap_<group>          UMAP grid (paper Figs 1, 5)            figdata/umap_<group>.csv
    qscore_<group>        Q-Score dense vs pruned (Fig 2)        tables/per_sample_<group>.csv
    pdscore_<group>       PD-Score dense vs pruned (Fig 3)       tables/per_sample_<group>.csv
    pie_classes_<group>   PIEs per class (Figs 4, 7)             tables/pie_per_class.csv, pie_overlap.csv
    pie_gallery_<group>   PIE images, U/S labels (Fig 6)         figdata/pie_images_<group>.npz, per_sample
    acc_pies_<group>      accuracy and PIE count vs sparsity     tables/populations.csv
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .cli import UserError
from .tables import column_name, in_order, lookup

# the paper's figure columns (Figs 2-5, 7); other (loss, method) pairs follow alphabetically
FIGURE_ORDER = [("ce", "gmp"), ("ce", "oneshot"), ("supcon", "gmp"), ("supcon", "oneshot"), ("supcon", "delta_gmp")]
LOSS_COLOURS = {"ce": ("#1f5fa8", "#a9c8ea"), "supcon": ("#d1601a", "#f6c7a3")}  # (strong, light)
OTHER_COLOURS = ("#444444", "#bbbbbb")
METHOD_STYLES = {"gmp": ("o", "-"), "oneshot": ("s", "--"), "delta_gmp": ("^", ":")}  # (marker, line style)
PIE_COLOUR = "#d62728"


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


def population_label(pops: pd.DataFrame, loss: str, method: str, sparsity: int):
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


def pick_sparsity(available, asked, default):
    """The asked sparsity if it is available (else a UserError listing the choices), or default(available)."""
    available = sorted(set(int(s) for s in available))
    if asked is None:
        return default(available)
    if int(asked) not in available:
        raise UserError(f"sparsity {asked}% not in this eval; available: {', '.join(map(str, available))}")
    return int(asked)


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
    from .evalfolder import atomic_path

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


def loss_colours(loss: str):
    return LOSS_COLOURS.get(loss, OTHER_COLOURS)


# ---------------------------------------------------------------- the figures
def umap_grid(eval_dir: Path, group: str, which: str = "first") -> list:
    """UMAP grid (paper Figs 1, 5): rows are sparsities (dense first), columns loss/method, colour = true class.

    The dense row repeats the dense population of each column's loss, as the tables do.
    which: 'first' (the population's first model) or 'mean' (h averaged over its models)."""
    path = Path(eval_dir) / "figdata" / f"umap_{group}.csv"
    if not path.is_file():
        raise MissingData("UMAP was not computed (add umap to whatislost-eval --metrics)")
    coords = pd.read_csv(path)
    coords = coords[coords.which == which]
    if coords.empty:
        raise MissingData(f"no UMAP coordinates of kind '{which}' in {path.name}")
    pops = coords.drop_duplicates("population")
    columns = pruned_pairs(pops) or figure_columns((loss, "dense") for loss in pops.loss.unique())
    sparsities = sorted({0, *pops.sparsity[pops.method != "dense"]})
    n_classes = int(coords.label.max()) + 1
    names, colours = class_names(eval_dir, group, n_classes), np.array(class_colours(n_classes))
    fig = new_figure(2.4 * len(columns) + 1.6, 2.4 * len(sparsities) + 0.4)
    axes = fig.subplots(len(sparsities), len(columns), squeeze=False)
    for i, s in enumerate(sparsities):
        for j, (loss, method) in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            label = population_label(pops, loss, method, s)
            points = coords[coords.population == label]
            if points.empty:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", color="grey", transform=ax.transAxes)
            else:
                # rasterized: a 10,000-point scatter per panel stays small in the PDF
                ax.scatter(points.x, points.y, c=colours[points.label.to_numpy()],
                           s=max(0.5, min(6.0, 2500 / len(points))), linewidths=0, rasterized=True)
            if i == 0:
                ax.set_title(column_name(loss, method), fontsize=11)
            if s == 0:
                ax.set_xlabel(f"{column_name(loss, 'dense')}", fontsize=8, color="grey")
            if j == 0:
                ax.set_ylabel("dense" if s == 0 else f"{s}% sparse", fontsize=11, fontweight="bold")
    handles = [axes[0, 0].scatter([], [], color=colours[c], s=30, label=names[c]) for c in range(n_classes)]
    fig.legend(handles=handles, loc="outside right center", title="true class", frameon=False)
    fig.suptitle(f"UMAP of the representation h ({'first model' if which == 'first' else 'mean over models'}), {group}")
    return save(fig, eval_dir, "umap", group)


def dense_vs_pruned(eval_dir: Path, group: str, score: str, sparsity=None) -> list:
    """Per-sample score of the dense population (x) against each pruned population (y) at one sparsity.

    score: 'q' (Q-Score, paper Fig 2) or 'pd' (PD-Score, Fig 3). One panel per loss/method;
    PIEs drawn in red on top; sparsity defaults to the highest one scored."""
    title, name = {"q": ("Q-Score", "qscore"), "pd": ("PD-Score", "pdscore")}[score]
    samples = read_per_sample(eval_dir, group)
    pops = load_populations(eval_dir)
    pops = pops[pops.group == group]
    panels = []  # (loss, method, sparsity, pruned label, dense label)
    for r in pops[pops.method != "dense"].itertuples():
        dense = population_label(pops, r.loss, "dense", 0)
        if dense and f"{r.population}:{score}" in samples and f"{dense}:{score}" in samples:
            panels.append((r.loss, r.method, int(r.sparsity), r.population, dense))
    if not panels:
        why = "prediction depth was not computed (add depth to --metrics)" if score == "pd" else \
            "Q-Score was not computed (add qscore to --metrics)"
        raise MissingData(f"no pruned population with a dense counterpart has {title}s: {why}")
    s = pick_sparsity([p[2] for p in panels], sparsity, max)
    panels = {(p[0], p[1]): p for p in panels if p[2] == s}
    order = figure_columns(panels)
    fig = new_figure(3.2 * len(order), 3.6)
    axes = fig.subplots(1, len(order), squeeze=False)[0]
    for ax, pair in zip(axes, order):
        loss, method, _, label, dense = panels[pair]
        x, y = samples[f"{dense}:{score}"], samples[f"{label}:{score}"]
        pie = samples[f"{label}:pie"].eq(1) if f"{label}:pie" in samples else pd.Series(False, index=samples.index)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.04 * (hi - lo or 1)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, zorder=1)
        ax.scatter(x[~pie], y[~pie], s=8, color=loss_colours(loss)[0], alpha=0.35, linewidths=0, rasterized=True,
                   label=f"non-PIE ({int((~pie).sum())})", zorder=2)
        ax.scatter(x[pie], y[pie], s=12, color=PIE_COLOUR, alpha=0.8, linewidths=0, rasterized=True,
                   label=f"PIE ({int(pie.sum())})", zorder=3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_title(column_name(loss, method))
        ax.set_xlabel(f"{title}, dense")
        ax.set_ylabel(f"{title}, {s}% sparse")
        ax.legend(loc="upper left", fontsize=8, markerscale=1.5)
    fig.suptitle(f"{title} per test sample: dense vs {s}% sparse (population means), {group}")
    return save(fig, eval_dir, name, group)


def qscore_scatter(eval_dir: Path, group: str, sparsity=None) -> list:
    """Q-Score of dense vs pruned models per sample (paper Fig 2)."""
    return dense_vs_pruned(eval_dir, group, "q", sparsity)


def pdscore_scatter(eval_dir: Path, group: str, sparsity=None) -> list:
    """PD-Score of dense vs pruned models per sample (paper Fig 3)."""
    return dense_vs_pruned(eval_dir, group, "pd", sparsity)


def pies_per_class(eval_dir: Path, group: str) -> list:
    """PIEs per true class (paper Figs 4, 7): rows are sparsities, columns loss/method.

    Strong colour: PIEs shared by Sup and SCL (same method and sparsity); light colour: PIEs
    unique to this loss. A column without a counterpart of the other loss is all light, and says so."""
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
            title = f"{column_name(loss, method)}, {s}%"
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
            ax.bar(x, total - shared, bottom=shared, color=light, width=0.8)
            if len(both) != len(total):
                title += f"\n(no {'SCL' if loss == 'ce' else 'Sup'} counterpart: all unique)"
            ax.set_title(title, fontsize=10)
            ax.set_xticks(x, names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=8)
            if j == 0:
                ax.set_ylabel("PIEs")
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=t) for c, t in
               ((LOSS_COLOURS["ce"][0], "Sup, shared with SCL"), (LOSS_COLOURS["ce"][1], "Sup, unique"),
                (LOSS_COLOURS["supcon"][0], "SCL, shared with Sup"), (LOSS_COLOURS["supcon"][1], "SCL, unique"))]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle(f"PIEs per true class, {group}")
    return save(fig, eval_dir, "pie_classes", group)


def gallery_rows(samples: pd.DataFrame, group_pops: pd.DataFrame, sparsity=None, per_row: int = 8):
    """Which PIEs the gallery shows: (sparsity, [(row title, [(sample id, dense label, sparse label)])]).

    Per pruned population at the sparsity (default the lowest, as the paper's Fig 6 shows
    30%), two rows: PIEs it classifies right and its dense population wrong, then the
    reverse; the first `per_row` of each by sample id. Labels are modal labels (class ids)."""
    samples = samples.set_index("sample_id", drop=False)
    pops = group_pops[[f"{p}:pie" in samples for p in group_pops.population]]
    if pops.empty:
        raise MissingData("no PIEs were computed, so there are no PIE images")
    s = pick_sparsity(pops.sparsity, sparsity, min)
    pops = pops[pops.sparsity == s].set_index(["loss", "method"])
    rows = []
    for loss, method in figure_columns(pops.index):
        label = pops.loc[(loss, method), "population"]
        dense = samples[f"{population_label(group_pops, loss, 'dense', 0)}:modal"]
        sparse, pie, truth = samples[f"{label}:modal"], samples[f"{label}:pie"].eq(1), samples.true_label
        for what, keep in (("sparse right,\ndense wrong", pie & (sparse == truth)),
                           ("dense right,\nsparse wrong", pie & (dense == truth))):
            ids = samples.sample_id[keep].head(per_row)
            rows.append((f"{column_name(loss, method)} {s}%\n{what}",
                         [(int(i), int(dense[i]), int(sparse[i])) for i in ids]))
    return s, rows


def pie_gallery(eval_dir: Path, group: str, sparsity=None, per_row: int = 8) -> list:
    """PIE images (paper Fig 6), chosen by `gallery_rows`, each captioned 'U: <dense label>  S: <sparse label>'."""
    path = Path(eval_dir) / "figdata" / f"pie_images_{group}.npz"
    if not path.is_file():
        raise MissingData(f"{path.name} is missing")
    npz = np.load(path)
    index = {int(i): k for k, i in enumerate(npz["sample_id"])}  # the npz holds the images of PIEs only
    images, names = npz["images"], [str(c) for c in npz["classes"]]
    pops = load_populations(eval_dir)
    s, chosen = gallery_rows(read_per_sample(eval_dir, group), pops[pops.group == group], sparsity, per_row)
    rows = [(title, [(images[index[i]], f"U: {names[u]}  S: {names[v]}") for i, u, v in cells if i in index])
            for title, cells in chosen]
    width, height = 1.45 * per_row + 1.6, 1.5 * len(rows) + 0.75
    fig = new_figure(width, height, layout=None)  # a fixed grid: constrained layout costs seconds on many axes
    fig.subplots_adjust(left=1.6 / width, right=0.99, bottom=0.1 / height, top=1 - 0.75 / height, wspace=0.15,
                        hspace=0.3)
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
                ax.set_title(caption, fontsize=7)
            elif c == 0:
                ax.text(0.05, 0.5, "none", color="grey", transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"PIEs at {s}% sparsity (U: dense modal label, S: sparse modal label), {group}")
    return save(fig, eval_dir, "pie_gallery", group)


def accuracy_and_pies(eval_dir: Path, group: str) -> list:
    """Test accuracy (mean ± std over models) and PIE count against sparsity, one line per loss/method.

    Each line starts at its loss's dense population. The PIE count is one number per
    population (from its modal labels), so it has no error bar."""
    pops = load_populations(eval_dir)
    pops = pops[pops.group == group]
    columns = pruned_pairs(pops) or figure_columns((loss, "dense") for loss in pops.loss.unique())
    sparsities = sorted({0, *pops.sparsity})
    where = {s: i for i, s in enumerate(sparsities)}  # evenly spaced: 90, 95, 99 stay apart
    has_pies = "pie_count" in pops and pops.pie_count.notna().any()
    fig = new_figure(11 if has_pies else 5.8, 4.2)
    axes = fig.subplots(1, 2 if has_pies else 1, squeeze=False)[0]
    for loss, method in columns:
        line = pops[(pops.loss == loss) & pops.method.isin(["dense", method])].sort_values("sparsity")
        marker, style = METHOD_STYLES.get(method, ("D", "-."))
        kw = dict(color=loss_colours(loss)[0], marker=marker, ls=style, label=column_name(loss, method))
        axes[0].errorbar(line.sparsity.map(where), line.acc_mean, yerr=line.acc_std, capsize=3, **kw)
        if has_pies:
            pruned = line[line.pie_count.notna()]
            axes[1].plot(pruned.sparsity.map(where), pruned.pie_count, **kw)
    for ax, ylabel in zip(axes, ("test accuracy % (mean ± std over models)", "PIE count")):
        ax.set_xticks(range(len(sparsities)), [f"{s}" for s in sparsities])
        ax.set_xlabel("sparsity %")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_pies:
        axes[1].set_ylim(0, 1.3 * pops.pie_count.max())  # a count: zero is meaningful; headroom for the legend
    fig.suptitle(f"Accuracy and PIEs against sparsity, {group}")
    return save(fig, eval_dir, "acc_pies", group)


# (name, title, function, caption) in the order the report shows them
FIGURES = [
    ("acc_pies", "Accuracy and PIEs against sparsity", accuracy_and_pies,
     "Test accuracy (mean ± std over each population's models) and PIE count (one number per population: "
     "samples whose modal label differs from the dense population's) against sparsity. "
     "Source: tables/populations.csv."),
    ("umap", "UMAP of the representation (paper Figs 1, 5)", umap_grid,
     "Rows: sparsity (dense first; the dense row repeats each column's dense population). Columns: loss/method. "
     "Points: test samples coloured by true class, in one model's representation (or the population mean; the "
     "title says which). Source: figdata/umap_<group>.csv."),
    ("qscore", "Q-Score, dense vs pruned (paper Fig 2)", qscore_scatter,
     "Per test sample, Q-Score averaged over the dense population's models (x) and the pruned population's (y), "
     "at one sparsity (default the highest; the title names it); black: identity line; red: PIEs. "
     "Source: tables/per_sample_<group>.csv."),
    ("pdscore", "PD-Score, dense vs pruned (paper Fig 3)", pdscore_scatter,
     "Per test sample, prediction depth averaged over the dense population's depth models (x) and the pruned "
     "population's (y), at one sparsity (default the highest); black: identity line; red: PIEs. "
     "Source: tables/per_sample_<group>.csv."),
    ("pie_classes", "PIEs per class (paper Figs 4, 7)", pies_per_class,
     "PIE count per true class, one row per sparsity. Strong colour: PIEs shared by Sup and SCL with the same "
     "method and sparsity; light colour: PIEs unique to the loss. "
     "Source: tables/pie_per_class.csv, tables/pie_overlap.csv."),
    ("pie_gallery", "PIE gallery (paper Fig 6)", pie_gallery,
     "Test images, at one sparsity (default the lowest, as in the paper), that the pruned population classifies "
     "right and the dense one wrong, and the reverse (the first by sample id). U: dense modal label, S: sparse "
     "modal label. Source: figdata/pie_images_<group>.npz, tables/per_sample_<group>.csv."),
]


def draw_figures(eval_dir: Path, scatter_sparsity=None, gallery_sparsity=None, umap_which: str = "first") -> list:
    """Draw every figure for every group; return one record per (group, figure):
    dict(group, name, title, caption, paths), plus missing=reason for a figure the eval lacks data for.

    scatter_sparsity: sparsity of the Q/PD-Score scatters (default the highest); gallery_sparsity:
    of the PIE gallery (default the lowest); umap_which: 'first' model or 'mean' representation."""
    import matplotlib

    options = {"qscore": dict(sparsity=scatter_sparsity), "pdscore": dict(sparsity=scatter_sparsity),
               "pie_gallery": dict(sparsity=gallery_sparsity), "umap": dict(which=umap_which)}
    records = []
    for group in groups(eval_dir):
        for name, title, draw, caption in FIGURES:
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
