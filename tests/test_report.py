"""Figures and the HTML report, drawn from a small eval output of the tiny digits populations."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whatislost import figures
from whatislost.config import UserError, run_cli
from whatislost.eval import run_eval
from whatislost.report import build_report, main

GROUP = "digits-wrn10-1"


def write_fake_umap(out: Path):
    """figdata/umap_<group>.csv as whatislost-eval writes it, with made-up coordinates (real UMAP costs ~30 s)."""
    samples = pd.read_csv(out / "tables" / f"per_sample_{GROUP}.csv")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (10, 2))
    frames = []
    for pop in pd.read_csv(out / "tables" / "populations.csv").itertuples():
        for which in ("first", "mean"):
            xy = centres[samples.true_label] + rng.normal(0, 1 + pop.sparsity / 25, (len(samples), 2))
            frames.append(pd.DataFrame(dict(population=pop.population, loss=pop.loss, method=pop.method,
                                            sparsity=pop.sparsity, which=which, sample_id=samples.sample_id,
                                            label=samples.true_label, x=xy[:, 0], y=xy[:, 1])))
    pd.concat(frames).to_csv(out / "figdata" / f"umap_{GROUP}.csv", index=False)


@pytest.fixture(scope="module")
def evaluated(tiny_populations, tmp_path_factory):
    """An eval folder of the tiny populations, with UMAP coordinates, and its report built once."""
    out = tmp_path_factory.mktemp("eval")
    run_eval(tiny_populations, out, metrics=("acc", "pie", "qscore", "depth"), depth_models=2, knn_k=5, report=False)
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
    assert sparsity == 50 and len(rows) == 2 * 3  # Sup/GMP, Sup/One-Shot, SCL/GMP: two rows each
    truth = samples.set_index("sample_id").true_label
    for title, cells in rows:
        assert 0 < len(cells) <= 5
        for sample, dense, sparse in cells:
            assert dense != sparse  # a PIE
            right, wrong = (sparse, dense) if "sparse right" in title else (dense, sparse)
            assert right == truth[sample] != wrong
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
    assert drawn == sorted(f"{n}_{GROUP}.png" for n in ("acc_pies", "qscore", "pie_classes", "pie_gallery"))


def test_page_lists_the_study_and_every_reference_exists(evaluated):
    out, index = evaluated
    page = index.read_text()
    assert index == out / "report" / "index.html"
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert not [r for r in refs if re.match(r"[a-z]+:", r)]  # nothing fetched: works offline
    assert "<script" not in page
    for ref in refs:
        assert (index.parent / ref).is_file(), ref
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(figures.FIGURES)
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


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium not installed (Debian: apt-get install chromium); page rendering not checked")
def test_page_renders_in_headless_chromium(evaluated, tmp_path):
    _, index = evaluated
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2000", index.resolve().as_uri()],
                   check=True, capture_output=True, timeout=90)
    assert shot.is_file() and not_blank(shot)
