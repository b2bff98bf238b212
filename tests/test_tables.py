"""The table tool (issue 23, defects 1-3): where it reads rows and presets, Hydra's sweep syntax in a preset,
LaTeX that compiles with booktabs, Markdown whose numbers all look alike, and the seeds each cell really has."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, load_script

BIN = Path(sys.executable).parent

PRESET = """\
hydra:
  sweeper:
    params:
      data_attack: none,badnets
      defense: none
      seed: {seeds}
report:
  title: {title}
  rows: [data_attack]
  metrics: [acc, asr]
  where: {{dataset: synthetic}}
"""


def write_rows(raw: Path, cells: list[tuple[str, int, float, float]]) -> None:
    """Rows as the pipeline writes them, with only what the table tool reads."""
    raw.mkdir(parents=True, exist_ok=True)
    for i, (attack, seed, acc, asr) in enumerate(cells):
        ch = {"dataset": "synthetic", "data_attack": attack, "defense": "none", "threat": "None"}
        row = {"choices": ch, "seed": seed, "metrics": {"acc": acc, "asr": asr}, "overrides": []}
        (raw / f"r{i}.json").write_text(json.dumps(row))


def write_preset(conf: Path, name: str, seeds: str = "0", title: str = "t") -> Path:
    (conf / "table").mkdir(parents=True, exist_ok=True)
    (conf / "table" / f"{name}.yaml").write_text(PRESET.format(seeds=seeds, title=json.dumps(title)))
    return conf


def table_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "securetl-table"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURETL_")}
    return env | extra


# --------------------------------------------------------------------------- defect 1
def test_the_table_tool_reads_rows_where_securetl_root_puts_them(tmp_path):
    """`SECURETL_ROOT=R securetl ...` writes to R/results; `SECURETL_ROOT=R securetl-table` must read there,
    from any working directory, and a user's preset is found with --config-dir (as `securetl -cd`)."""
    root = tmp_path / "R"
    write_rows(root / "results" / "raw", [("none", 0, 0.9, 0.01), ("badnets", 0, 0.8, 0.95)])
    conf = write_preset(tmp_path / "myconf", "mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = table_cli(["mine", "--config-dir", str(conf)], clean_env(SECURETL_ROOT=str(root)), elsewhere)
    assert out.returncode == 0, out.stderr
    assert "| badnets" in out.stdout and "95.00" in out.stdout
    assert (root / "results" / "tables" / "mine.md").exists()
    assert not (elsewhere / "results").exists()

    # SECURETL_RESULTS_DIR wins over SECURETL_ROOT, as in conf/paths/default.yaml
    other = tmp_path / "other"
    write_rows(other / "raw", [("none", 0, 0.5, 0.02)])
    env = clean_env(SECURETL_ROOT=str(root), SECURETL_RESULTS_DIR=str(other))
    out = table_cli(["mine", "-cd", str(conf)], env, ROOT)
    assert out.returncode == 0, out.stderr
    assert "50.00" in out.stdout and "95.00" not in out.stdout

    # a preset that exists nowhere names the folders searched
    out = table_cli(["nope", "-cd", str(conf)], clean_env(SECURETL_ROOT=str(root)), elsewhere)
    assert out.returncode != 0 and str(conf / "table") in out.stderr and "mine" in out.stderr


def test_an_empty_root_says_where_it_looked(tmp_path):
    out = table_cli(["demo"], clean_env(SECURETL_ROOT=str(tmp_path)), tmp_path)
    assert out.returncode != 0 and str(tmp_path / "results" / "raw") in out.stderr


# --------------------------------------------------------------------------- defect 2
@pytest.mark.parametrize(
    "text,values",
    [
        ("range(0,2)", ["0", "1"]),
        ("range(3)", ["0", "1", "2"]),
        ("0,1,2", ["0", "1", "2"]),
        ("choice(1, 2)", ["1", "2"]),
        ("0", ["0"]),
        ("[0, 1]", ["0", "1"]),  # a YAML list
    ],
)
def test_sweep_syntax_is_parsed_as_hydra_parses_it(text, values):
    from omegaconf import OmegaConf

    from securetl.tables import parse_sweep

    params = OmegaConf.to_container(OmegaConf.create(f"seed: {text}"))
    assert parse_sweep(params) == {"seed": values}


def test_other_sweep_forms():
    from securetl.tables import parse_sweep

    sweep = parse_sweep(
        {
            "data_attack.poison_rate": "0.003,1e-2",  # floats as the rows' configs hold them
            "trigger@eval.reference_trigger": "htba_random",
            "lr": "interval(0.01, 0.1)",  # an Optuna search space: nothing to enumerate, nothing restricted
            "ablation": "glob(no_*)",
        }
    )
    assert sweep["data_attack.poison_rate"] == ["0.003", "0.01"]
    assert sweep["trigger@eval.reference_trigger"] == ["htba_random"]
    assert "lr" not in sweep
    assert sweep["ablation"] == ["no_bootstrap", "no_channel_filter", "no_expansion", "no_tis"]


def test_a_preset_with_a_range_sweep_renders_its_rows(tmp_path):
    from securetl.tables import render

    conf = write_preset(tmp_path / "conf", "ranged", seeds="range(0,2)")
    write_rows(tmp_path / "results" / "raw", [("none", 0, 0.9, 0.0), ("none", 1, 0.8, 0.0)])
    md = render("ranged", tmp_path / "results", conf_dir=conf)
    assert "no matching rows" not in md and "85.00 ± 7.07" in md


# --------------------------------------------------------------------------- defect 3
TEX_COMMANDS = {"begin", "end", "centering", "caption", "label", "toprule", "midrule", "bottomrule"}
TEX_COMMANDS |= {"pm", "times", "textbackslash", "textasciitilde", "textasciicircum", "textless"}
TEX_COMMANDS |= {"textgreater"}


def check_booktabs_latex(tex: str) -> None:
    """A small LaTeX checker, for machines without TeX: only commands that plain LaTeX + booktabs define,
    balanced braces and environments, math only around \\pm/\\times, no unescaped special character, every
    tabular row with as many cells as the column spec says, and ASCII only (pdflatex without inputenc)."""
    assert tex.isascii(), "non-ASCII characters need inputenc"
    stack: list[str] = []
    depth, in_math, cols, i = 0, False, None, 0
    row_cells = 1
    while i < len(tex):
        ch = tex[i]
        if ch == "\\":
            m = re.match(r"\\([A-Za-z]+|.)", tex[i:])
            name = m.group(1)
            i += len(m.group(0))
            if name == "\\":  # end of a tabular row
                assert stack and stack[-1] == "tabular", "\\\\ outside a tabular"
                assert row_cells == cols, f"a row has {row_cells} cells, the spec {cols}"
                row_cells = 1
                continue
            if not name.isalpha():
                assert name in "&%$#_{}", f"unknown escape \\{name}"
                continue
            assert name in TEX_COMMANDS, f"\\{name} is not a plain LaTeX / booktabs command"
            if name in ("pm", "times"):
                assert in_math, f"\\{name} outside math"
            if name == "label":  # a key, not text: `_` is fine there
                key = re.match(r"\{([\w:.-]+)\}", tex[i:])
                assert key, "a label key of letters, digits and :_.-"
                i += len(key.group(0))
                continue
            if name in ("begin", "end"):
                env = re.match(r"\{(\w+)\}", tex[i:]).group(1)
                i += len(env) + 2
                if name == "begin":
                    stack.append(env)
                    if env == "tabular":
                        spec = re.match(r"\{([lrc]+)\}", tex[i:])
                        assert spec, "tabular needs a column spec of l/r/c"
                        cols, i = len(spec.group(1)), i + len(spec.group(0))
                else:
                    assert stack and stack.pop() == env, f"\\end{{{env}}} does not close the open environment"
            continue
        if ch == "$":
            in_math = not in_math
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            assert depth >= 0, "unbalanced }"
        elif ch == "&":
            assert stack and stack[-1] == "tabular", "& outside a tabular"
            row_cells += 1
        elif ch in "#%_^~":
            raise AssertionError(f"unescaped {ch!r} at {tex[max(0, i - 20) : i + 20]!r}")
        i += 1
    assert depth == 0 and not stack and not in_math


def test_latex_compiles_with_booktabs(tmp_path):
    from securetl.tables import render

    conf = write_preset(tmp_path / "conf", "my_demo", seeds="0,1", title="my_demo: 100% & #1 ~x^2")
    write_rows(
        tmp_path / "results" / "raw",
        [("none", 0, 0.886, 0.01), ("none", 1, 0.886, 0.02), ("badnets", 0, 0.8, 0.9472)],
    )
    render("my_demo", tmp_path / "results", conf_dir=conf)
    tex = (tmp_path / "results" / "tables" / "my_demo.tex").read_text()
    check_booktabs_latex(tex)
    assert r"\caption{my\_demo: 100\% \& \#1 \textasciitilde{}x\textasciicircum{}2" in tex
    assert "\\cline" not in tex and "\\hline" not in tex and "\\multirow" not in tex
    assert r"88.60 $\pm$ 0.00" in tex
    if shutil_which("pdflatex"):  # where a TeX is installed, compile it for real
        doc = tmp_path / "doc.tex"
        doc.write_text(
            "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex + "\\end{document}\n"
        )
        out = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout[-2000:]


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def test_the_checker_rejects_what_the_old_writer_produced():
    """pandas' to_latex output (\\cline beside booktabs rules, an unescaped caption) fails the checker."""
    bad = "\\begin{table}\n\\caption{my_demo}\n\\begin{tabular}{ll}\n\\toprule\na & b \\\\\n\\cline{1-2}\n"
    bad += "\\bottomrule\n\\end{tabular}\n\\end{table}\n"
    with pytest.raises(AssertionError):
        check_booktabs_latex(bad)
    with pytest.raises(AssertionError):
        check_booktabs_latex(bad.replace("my_demo", "my\\_demo"))  # \cline still


def test_markdown_formats_every_number_alike_and_counts_the_real_seeds(tmp_path):
    """ACC 88.60 stays "88.60" beside "94.72 ± 1.00" (tabulate used to parse it into 88.6), and a table
    whose sweep has 3 seeds but whose cells have 2 says 2; a cell with another count is marked."""
    from securetl.tables import render

    conf = write_preset(tmp_path / "conf", "seeds", seeds="0,1,2")
    write_rows(
        tmp_path / "results" / "raw",
        [
            ("none", 0, 0.886, 0.0),
            ("none", 1, 0.886, 0.0),
            ("badnets", 0, 0.8, 0.9372),
            ("badnets", 1, 0.8, 0.9572),
            ("badnets", 2, 0.8, 0.9472),
        ],
    )
    md = render("seeds", tmp_path / "results", conf_dir=conf)
    assert "88.60 ± 0.00 [n=2]" in md and re.search(r"80\.00 ± 0\.00\s+\|", md)
    table = [line for line in md.splitlines() if line.startswith("|")]
    numbers = re.findall(r"\d+\.\d+", "\n".join(table))
    assert numbers and all(re.fullmatch(r"\d+\.\d\d", n) for n in numbers), numbers
    # the badnets cell has 3 seeds, the none cell 2 (its seed 2 is missing): the note is about the cells
    assert "over 3 seeds" in md and "[n=2]" in md and "marked [n=k]" in md
    assert "seed(s)" not in md

    one = write_preset(tmp_path / "conf1", "one", seeds="0")
    md = render("one", tmp_path / "results", conf_dir=one)
    assert "one seed." in md
    row = next(line for line in md.splitlines() if line.startswith("| none"))
    assert re.search(r"\|\s*88\.60\s*\|\s*0\.00\s*\|", row), row


def test_defense_summary_charges_m0_to_its_users_and_counts_what_a_split_set_apart():
    """ASR is averaged over the attacked threats only; an isolated set's precision and recall are its poisons over
    its size and over all poisons; M0's training (cached after the first run of a cell) is charged to a method
    that starts from M0 and not to one that does not, and a run that trained M0 is not charged twice."""
    import pandas as pd

    summarize = load_script("summarize_defenses").summarize
    rows = []
    for threat, asr in (("clean", None), ("t2_badnets", 0.8), ("t2_blended", 0.6)):
        poisons = 0 if threat == "clean" else 400
        rows += [
            {
                "threat": threat,
                "defense": "none",
                "acc": 0.9,
                "asr": asr,
                "time:defense": 40.0,
                "defense._target_": "securetl.interfaces.NoDefense",
                "diag:n_poison": poisons,
            },
            {
                "threat": threat,
                "defense": "abl",
                "acc": 0.5,
                "asr": None if asr is None else asr / 2,
                "time:defense": 40.0,
                "defense._target_": "securetl.defenses.abl.ABL",
                "diag:n_poison": poisons,
                "diag:isolated/n_poison": 0 if threat == "clean" else 10,
                "diag:isolated/size": 40,
            },
            # the first fp run trained M0 (50 s inside its 130 s), the others found it in the cache
            {
                "threat": threat,
                "defense": "fp",
                "acc": 0.8,
                "asr": asr,
                "time:defense": 130.0 if threat == "clean" else 80.0,
                "defense._target_": "securetl.defenses.fp.FinePruning",
                "diag:n_poison": poisons,
                "diag:m0/cached": threat != "clean",
                "diag:m0/seconds": 50.0,
            },
        ]
    out = summarize(pd.DataFrame(rows), ["defense"])
    assert out.loc["none", "ASR"] == pytest.approx(70.0) and out.loc["abl", "ASR"] == pytest.approx(35.0)
    assert out.loc["abl", "isolated poisons/size"] == "20/80"
    assert out.loc["abl", "isolated precision"] == pytest.approx(0.25)
    assert out.loc["abl", "isolated recall"] == pytest.approx(20 / 800)
    assert out.loc["abl", "M0 s"] == 0 and out.loc["abl", "x none"] == pytest.approx(1.0)
    assert out.loc["fp", "own s"] == pytest.approx(80.0) and out.loc["fp", "M0 s"] == pytest.approx(50.0)
    assert out.loc["fp", "x none"] == pytest.approx(130 / 40)
