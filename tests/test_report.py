"""Figures and the HTML report, drawn from a small eval output of the tiny digits populations."""
import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

from whatislost import evalfolder, figures
from whatislost.cli import UserError, run_cli
from whatislost.eval import run_eval
from whatislost.report import build_report, main

GROUP = "digits-wrn10-1"


def write_fake_umap(out: Path):
    """figdata/umap_<group>.csv as whatislost-eval writes it, with made-up coordinates (real UMAP costs ~30 s)."""
    samples = pd.read_csv(out / "tables" / f"per_sample_{GROUP}.csv")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (10, 2))
    frames = []
    for pop in pd.read_csv(out / "tables" / "populations.csv", keep_default_na=False).itertuples():
        pie = samples.get(f"{pop.population}:pie", pd.Series(0, index=samples.index))
        for which in ("first", "mean"):
            xy = centres[samples.true_label] + rng.normal(0, 1 + pop.sparsity / 25, (len(samples), 2))
            frames.append(pd.DataFrame(dict(population=pop.population, loss=pop.loss, method=pop.method,
                                            sparsity=pop.sparsity, which=which, aligned_to=pop.reference,
                                            sample_id=samples.sample_id, label=samples.true_label,
                                            pred=samples[f"{pop.population}:modal"], pie=pie, x=xy[:, 0], y=xy[:, 1])))
    pd.concat(frames).to_csv(out / "figdata" / f"umap_{GROUP}.csv", index=False)


@pytest.fixture(scope="module")
def evaluated(tiny_populations, tmp_path_factory):
    """An eval folder of the tiny populations, with UMAP coordinates, and its report built once."""
    out = tmp_path_factory.mktemp("eval")
    run_eval(tiny_populations, out, metrics=("acc", "pie", "qscore", "depth", "cka"), depth_models=2, knn_k=5,
             report=False)
    write_fake_umap(out)
    return out, build_report(out)


def not_blank(png: Path) -> bool:
    from matplotlib.image import imread

    return float(imread(png)[..., :3].std()) > 0.05


def test_every_figure_is_drawn_as_png_and_pdf(evaluated):
    out, _ = evaluated
    for name, *_ in figures.FIGURES:
        png, pdf = out / "figures" / f"{name}_{GROUP}.png", out / "figures" / f"{name}_{GROUP}.pdf"
        assert png.is_file() and pdf.is_file(), name
        assert not_blank(png), name
        assert pdf.read_bytes()[:5] == b"%PDF-"


def test_gallery_shows_what_its_rows_say(evaluated):
    out, _ = evaluated
    samples = pd.read_csv(out / "tables" / f"per_sample_{GROUP}.csv")
    pops = figures.load_populations(out)
    sparsity, rows = figures.gallery_rows(samples, pops, per_row=5)
    assert sparsity == 50 and len(rows) == 3 * 3  # Sup/GMP, Sup/One-Shot, SCL/GMP: three rows each
    truth = samples.set_index("sample_id").true_label
    shown_of = {}
    for title, cells in rows:
        population = title.split("\n")[0].replace(" 50%", "/50")
        shown, total = map(int, re.search(r"(\d+) of (\d+) shown", title).groups())
        assert shown == len(cells) == min(5, total)
        shown_of[population] = shown_of.get(population, 0) + total
        for sample, true, dense, sparse in cells:
            assert dense != sparse and true == truth[sample]  # a PIE, with its true label
            if "sparse right" in title:
                assert sparse == true != dense
            elif "dense right" in title:
                assert dense == true != sparse
            else:
                assert "both wrong" in title and true not in (dense, sparse)
    # the three rows of a population together cover every one of its PIEs (both wrong included)
    counts = pops.set_index("population").pie_count
    assert shown_of == {p: counts[p] for p in shown_of}
    with pytest.raises(UserError, match="available: 50"):
        figures.gallery_rows(samples, pops, sparsity=90)


def test_missing_inputs_skip_their_figures_and_say_why(evaluated, tmp_path):
    out, _ = evaluated
    partial = Path(shutil.copytree(out, tmp_path / "eval", ignore=shutil.ignore_patterns("figures", "report")))
    (partial / "figdata" / f"umap_{GROUP}.csv").unlink()
    samples = pd.read_csv(partial / "tables" / f"per_sample_{GROUP}.csv")
    samples.drop(columns=[c for c in samples if c.endswith(":pd")]).to_csv(
        partial / "tables" / f"per_sample_{GROUP}.csv", index=False)  # as if run without depth
    page = build_report(partial).read_text()
    assert re.search(r"UMAP.*not drawn: UMAP was not computed", page)
    assert re.search(r"PD-Score.*not drawn: .*prediction depth was not computed", page)
    drawn = sorted(p.name for p in (partial / "figures").glob("*.png"))
    assert drawn == sorted(f"{n}_{GROUP}.png" for n in ("acc_pies", "training_curves", "layer_sparsity", "qscore",
                                                         "pie_classes", "pie_gallery", "cka"))


def test_page_lists_the_study_and_every_reference_exists(evaluated):
    out, index = evaluated
    page = index.read_text()
    assert index == out / "report" / "index.html"
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(figures.FIGURES)
    # the figures are in the page itself (one file to mail), each the PNG beside it
    pngs = {base64.b64decode(i.split(",", 1)[1]) for i in images if i.startswith("data:image/png;base64,")}
    assert pngs == {p.read_bytes() for p in (out / "figures").glob("*.png")}
    refs = [r for r in re.findall(r'(?:src|href)="([^"#]+)"', page) if r not in images]
    assert not [r for r in refs if re.match(r"[a-z]+:", r)]  # nothing fetched: works offline
    assert "<script" not in page
    for ref in refs:
        assert (index.parent / unquote(ref)).is_file(), ref
    for label in ("Sup/Dense/0", "Sup/GMP/50", "Sup/One-Shot/50", "SCL/Dense/0", "SCL/GMP/50"):
        assert label in page
    for title in ("Table 1", "Table 4", "Table 5", "Table 6", "Missing or failed runs"):
        assert title in page
    assert "SCL/One-Shot" not in page.split("Missing or failed runs")[1].split("</ul>")[0]  # no such column: no gap
    assert page.count("<details>") == 5 and "GlobalMagnitudePruningModifier" in page and "seed: 1" not in page


def test_report_cli_errors_are_exit_2(evaluated, tmp_path, capsys):
    out, _ = evaluated
    assert run_cli(main, [str(tmp_path)], prog="whatislost-report") == 2
    assert "no summary.json" in capsys.readouterr().err
    assert run_cli(main, [str(out), "--scatter-sparsity", "90"], prog="whatislost-report") == 2
    assert "sparsity 90% not in this eval" in capsys.readouterr().err


def test_overview_and_significance_say_what_is_significant(evaluated):
    out, index = evaluated
    page = html.unescape(index.read_text()).replace("\xa0", " ")  # intervals are kept on one line
    pops = pd.read_csv(out / "tables" / "populations.csv").set_index("population")
    overview = page.split('id="overview"')[1].split('id="significance"')[0]
    for population in ("Sup/GMP/50", "Sup/One-Shot/50", "SCL/GMP/50"):
        row = pops.loc[population]
        # the PIE count with its interval, the tied samples and the count under the other rule, side by side
        cells = f"<td>{int(row.pie_count)} [{int(np.floor(row.pie_count_ci_low))}, " \
                f"{int(np.ceil(row.pie_count_ci_high))}]</td><td>{int(row.pie_tied)}</td><td>{int(row.pie_count_other)}"
        assert cells in overview, population
    if pops.pie_tie_warning.fillna(False).astype(bool).any():
        assert "The tie rule could change a conclusion" in overview
    significance = page.split('id="significance"')[1].split('id="inventory"')[0]
    tests = pd.read_csv(out / "tables" / "pie_comparison.csv")
    assert "Does SCL have more PIEs than Sup?" in significance and len(tests) == 1  # GMP 50: the only pair
    assert f"<td>{tests.n_sup[0]}</td><td>{tests.n_scl[0]}</td><td>{tests['diff'][0]:+d} [" in significance
    assert "Classes whose recall changed" in significance and "Benjamini-Hochberg" in significance
    # every table says what its ± is over, and gives n
    tables = page.split('id="tables"')[1].split('id="figures"')[0]
    assert "mean±std over the population's n models" in tables and "std over the test samples" in tables
    assert "(450 test images, 2 models per population)" in tables
    n_pie = int(pops.loc["Sup/GMP/50", "pd_pie_n"])
    assert re.search(rf"±[0-9.]+ \[[0-9.]+, [0-9.]+\] n={n_pie}</td>", tables)


RENDER_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight,
                                                 shown: i.getBoundingClientRect().width}));
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({images, overflow: document.documentElement.scrollWidth - window.innerWidth});
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path, *args):
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", *args],
                          check=True, capture_output=True, timeout=90, text=True).stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium not installed (Debian: apt-get install chromium); page rendering not checked")
def test_page_renders_in_headless_chromium(evaluated, tmp_path):
    """The page alone (copied away from its eval folder, as when mailed) shows every figure, decoded, within the
    window's width; no table widens the page."""
    _, index = evaluated
    alone = tmp_path / "mailed.html"
    alone.write_text(index.read_text().replace("</body>", RENDER_CHECK + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", "--virtual-time-budget=10000", alone.as_uri())
    check = json.loads(html.unescape(re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S).group(1)))
    images = check["images"]
    assert len(images) == len(figures.FIGURES)
    assert sorted(i["alt"] for i in images) == sorted(f"{title}, {GROUP}" for _, title, *_ in figures.FIGURES)
    for image in images:
        assert image["w"] > 100 and image["h"] > 100, image  # decoded: a real picture, not a broken-image icon
        assert 0 < image["shown"] <= 1200, image
    assert check["overflow"] <= 0  # wide tables scroll in their box; the page itself does not
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", alone.as_uri())
    assert shot.is_file() and not_blank(shot)


# ---------------------------------------------------------------- an eval folder holds only the current eval
def files_in(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_new_eval_leaves_only_its_own_outputs_and_nothing_else_is_touched(tiny_populations, tmp_path):
    out = tmp_path / "E"
    run_eval(tiny_populations, out, metrics=("acc", "pie", "qscore", "depth"), depth_models=2, knn_k=5)
    first = set(evalfolder.marker_files(out))
    assert first == files_in(out) - {evalfolder.MARKER}
    assert {"tables/table5.csv", "tables/table6.md", f"figures/pdscore_{GROUP}.png", "report/index.html"} <= first
    mine = {"notes.txt": b"mine", "tables/my_table.csv": b"a\n1\n", "figures/sketch.png": b"png",
            "figdata/extra.npz": b"npz"}
    for rel, data in mine.items():
        (out / rel).write_bytes(data)

    # eval B: no Q-Score, no depth -> Tables 4-6, their figures and per-sample columns must all go
    run_eval(tiny_populations, out, metrics=("acc", "pie"))
    for name in ("table4", "table5", "table6"):
        assert not (out / "tables" / f"{name}.csv").exists() and not (out / "tables" / f"{name}.md").exists()
    assert not list((out / "figures").glob("qscore_*")) and not list((out / "figures").glob("pdscore_*"))
    samples = pd.read_csv(out / "tables" / f"per_sample_{GROUP}.csv")
    assert not [c for c in samples if c.endswith((":q", ":pd"))]
    page = (out / "report" / "index.html").read_text()
    assert page.count("Not computed in this eval") == 3  # Tables 4, 5, 6
    assert "Sup/GMP non-PIE" not in page and "Sup/GMP Q" not in page and "SCL/GMP Q" not in page
    assert "metrics: acc,pie" in page
    assert all((out / rel).read_bytes() == data for rel, data in mine.items())
    assert set(evalfolder.marker_files(out)) == files_in(out) - {evalfolder.MARKER} - set(mine)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(evalfolder.STAGING_PREFIX)]

    # --no-report: the report and figures of the earlier eval would be stale, so they go too
    run_eval(tiny_populations, out, metrics=("acc", "pie", "qscore"), report=False)
    assert not (out / "report").exists() and sorted(p.name for p in (out / "figures").iterdir()) == ["sketch.png"]
    assert (out / "tables" / "table5.csv").is_file()

    # an eval folder of an older version (no marker): the files with the eval's names are its own
    (out / evalfolder.MARKER).unlink()
    run_eval(tiny_populations, out, metrics=("acc",), report=False)
    assert not (out / "tables" / "table5.csv").exists() and not (out / "tables" / "table4.md").exists()
    assert all((out / rel).read_bytes() == data for rel, data in mine.items())
    assert set(evalfolder.marker_files(out)) == files_in(out) - {evalfolder.MARKER} - set(mine)


def test_a_file_with_an_eval_name_the_eval_did_not_write_is_kept_and_warned(tiny_populations, tmp_path, capsys):
    out = tmp_path / "E"
    run_eval(tiny_populations, out, metrics=("acc",), report=False)
    (out / "tables" / "table6.csv").write_text("group,x\nmine,1\n")  # not in the marker: the user's
    run_eval(tiny_populations, out, metrics=("acc",), report=False)
    assert (out / "tables" / "table6.csv").read_text() == "group,x\nmine,1\n"
    summary = evalfolder.load_summary(out)
    assert any("table6.csv was not written by whatislost-eval" in w for w in summary["warnings"])
    assert "table6.csv was not written by whatislost-eval" in capsys.readouterr().err


def test_report_rebuild_removes_only_its_stale_figures(evaluated, tmp_path):
    out = Path(shutil.copytree(evaluated[0], tmp_path / "E"))
    (out / "figures" / "sketch.png").write_bytes(b"mine")
    (out / "figdata" / f"umap_{GROUP}.csv").unlink()  # UMAP no longer drawable: its old figure is stale
    assert run_cli(main, [str(out)], prog="whatislost-report") == 0
    assert not (out / "figures" / f"umap_{GROUP}.png").exists() and (out / "figures" / "sketch.png").read_bytes() == b"mine"
    assert (out / "figures" / f"acc_pies_{GROUP}.png").is_file()
    assert "umap" not in " ".join(evalfolder.marker_files(out))


# ---------------------------------------------------------------- names from data are escaped
HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "<img src=x onerror=alert(2)>",
           "<svg onload=alert(3)>", "<b>cat$x$"]


def test_hostile_names_are_escaped_everywhere(tmp_path):
    """Data set folder, class names, run folders and the method name carry markup: the page shows them as text,
    and file names with them are URL-quoted in src/href."""
    from conftest import tiny_config, write_imagefolder
    from whatislost.train import train

    root = write_imagefolder(tmp_path / HOSTILE[1], (HOSTILE[2], HOSTILE[4]), n_train=12, n_test=6, size=8)
    runs = tmp_path / f"runs{HOSTILE[3]}"
    common = dict(dataset="imagefolder", data_root=str(root), batch_size=8, epochs=2, seed=0)
    for seed in (0, 1):
        common["seed"] = seed
        train(tiny_config(runs / f"{HOSTILE[2]}-dense{seed}", recipe="recipes/dense.yaml", **common))
        train(tiny_config(runs / f"gmp{seed}", recipe="recipes/gmp.yaml", sparsity=0.5, method=HOSTILE[0], **common))
    out = run_eval(runs, tmp_path / "E", metrics=("acc", "pie", "qscore", "depth"), depth_models=1, knn_k=3)
    page = (out / "report" / "index.html").read_text()
    for text in HOSTILE:
        assert text not in page, text
    assert "<script" not in page and "<img src=x" not in page and "<svg" not in page and "<b>cat" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text
    refs = [r for r in re.findall(r'(?:src|href)="([^"#]+)"', page) if not r.startswith("data:image/png;base64,")]
    assert any("%22%3E%3Cimg" in r for r in refs)
    for ref in refs:
        assert not re.match(r"[a-z]+:", ref) and (out / "report" / unquote(ref)).is_file(), ref
    assert len(re.findall(r"<img ", page)) == len(list((out / "figures").glob("*.png")))
