"""The README and the task pages in docs/ stay true: every relative link resolves to a tracked file, every
``facemarks …`` command shown parses with the real parser (and its subcommand's ``--help`` runs), every script path
shown exists, the README's embedded results table is what ``facemarks summary`` writes from the committed
``metrics/eval.json``, and the README's ``dvc exp show`` command fits 120 columns on a real DVC repository."""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from facemarks import cli

from facemarks.reporting import summary

from conftest import make_repo, sh

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "studies" / "README.md", *(ROOT / "docs").glob("*.md")])
TASK_PAGES = ("results", "experiments", "realism", "predict", "deploy", "team")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SCRIPT = re.compile(r"(?<![\w/.-])((?:stages|studies|benchmarks|src|tests|presets)/[\w./-]+\.(?:py|yaml))\b")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (a link inside code is no link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def bash_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "")]


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at ``&&``, ``||``,
    ``|`` and ``;``."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        cmd: list[str] = []
        for w in words + [";"]:
            if w in ("&&", "||", "|", ";"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def tracked_files() -> set[str] | None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def facemarks_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for block in bash_blocks(page.read_text(encoding="utf-8")):
            for cmd in shell_commands(block):
                if cmd and cmd[0] == "facemarks":
                    found.append((rel(page), cmd[1:]))
    return found


def test_every_relative_link_resolves_to_a_tracked_file():
    tracked = tracked_files()
    checked, broken = 0, []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor of the same page
            path = (page.parent / target.split("#")[0]).resolve()
            checked += 1
            if not path.exists():
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif tracked is not None and path.is_file() and rel(path) not in tracked:
                broken.append(f"{rel(page)}: {target} (not tracked by git: a fresh clone lacks it)")
            elif tracked is not None and path.is_dir() and not any(f.startswith(rel(path) + "/") for f in tracked):
                broken.append(f"{rel(page)}: {target} (a folder without tracked files)")
    assert checked >= 20, f"only {checked} relative links found: the link pattern is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_facemarks_command_shown_parses_and_its_help_runs():
    commands = facemarks_commands()
    assert len(commands) >= 10, commands
    parser = cli.build_parser()
    bad = []
    for page, argv in commands:
        try:
            parser.parse_args(cli.join_numeric_values(argv))
        except SystemExit:
            bad.append(f"{page}: facemarks {shlex.join(argv)}")
    assert not bad, "commands the real parser rejects:\n" + "\n".join(bad)
    script = Path(sys.executable).with_name("facemarks")
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "facemarks.cli"]
    for sub in sorted({argv[0] for _, argv in commands}):
        proc = subprocess.run([*launcher, sub, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and f"usage: facemarks {sub}" in proc.stdout, (sub, proc.stderr[-2000:])


def test_a_command_with_a_wrong_option_is_caught():
    """The parse check can fail: an option the parser does not know, or a value outside its choices."""
    parser = cli.build_parser()
    for argv in (["predict", "x.jpg", "--detectr", "hog"], ["predict", "x.jpg", "--detector", "mtcnn"],
                 ["summary", "--chek"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_every_script_and_file_path_in_a_command_exists():
    missing = []
    for page in PAGES:
        for block in bash_blocks(page.read_text(encoding="utf-8")):
            for path in SCRIPT.findall(block):
                if not (ROOT / path).is_file():
                    missing.append(f"{rel(page)}: {path}")
    assert not missing, missing


def test_readme_is_short_links_every_task_page_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for heading in ("## Two commands", "## Results at a glance", "## Use it"):
        assert heading in text
    for name in TASK_PAGES:
        assert f"](docs/{name}.md)" in text, name
        page = (ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8")
        opening = page.split("\n\n")[1]  # the paragraph after the title says who the page is for
        assert opening.startswith("**For**"), (name, opening[:80])
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = next(line for line in text.splitlines() if line.endswith("python -m pytest"))
    assert test_cmd in ci, "the README's test command is not what .ci/run runs"
    assert "pip install -e '.[peers,test]' && dvc repro" in text
    assert re.search(r"!\[[^\]]+\]\(reports/[^)]+\.png\)", text), "one figure from reports/"


def test_readme_table_is_what_facemarks_summary_writes_from_the_committed_metrics():
    assert summary.refresh(ROOT, check=True) == [], "README.md / reports/summary.md are stale: run `facemarks summary`"
    report = summary.load_report(ROOT / summary.EVAL_PATH)
    block = summary.embedded((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block == summary.results_table(report, summary.threshold_of(ROOT / "params.yaml"))
    for loss in summary.losses_of(report):  # the numbers come from the file, not from the code
        assert f"{report[loss]['nme_io']:.2f} (" in block


def _summary_repo(tmp_path: Path) -> Path:
    for f in ("README.md", "params.yaml", summary.EVAL_PATH):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp_path / f)
    return tmp_path


def test_summary_follows_the_evaluation_file_and_check_catches_a_stale_readme(tmp_path, capsys):
    repo = _summary_repo(tmp_path)
    report = json.loads((repo / summary.EVAL_PATH).read_text())
    losses = summary.losses_of(report)
    if "awing" not in losses:  # a third loss, as `train.losses: [mse, bce, awing]` gives
        report["awing"] = copy.deepcopy(report[losses[0]])
        report["losses"] = [*losses, "awing"]
    report["awing"]["nme_io"] = 5.4321
    report["winner"] = "awing"
    # the photos block as evaluate writes it (facemarks.evaluation.real_photos.photos_report): 6 faces in 5 photos, one of them
    # human-marked; per-face NME chosen so that each loss has a known median
    import numpy as np

    from facemarks.evaluation.real_photos import PhotoFace, PhotoSet, photos_report

    faces = [PhotoFace(f"p{i}.jpg", 0, f"{i:064x}", "human" if i == 0 else "dlib", (10.0, 10.0, 80.0, 80.0), "dlib",
                       (12.0, 12.0, 78.0, 78.0), np.zeros((68, 2))) for i in range(5)]
    faces.append(PhotoFace("p4.jpg", 1, f"{4:064x}", "dlib", (100.0, 10.0, 80.0, 80.0), "dlib", None, np.zeros((68, 2))))
    per_face = np.array([6.0, 6.5, 7.0, 7.0, 8.0, 9.0])
    nme = {loss: per_face + i for i, loss in enumerate(report["losses"])}
    report["photos"] = photos_report(PhotoSet("../shared/real-photos", faces, {}, 5, []), nme,
                                     {loss: "dark" for loss in report["losses"]})
    (repo / summary.EVAL_PATH).write_text(json.dumps(report))

    assert cli.main(["summary", "--root", str(repo), "--check"]) == 1
    assert "README.md is stale" in capsys.readouterr().err
    assert cli.main(["summary", "--root", str(repo)]) == 0
    assert cli.main(["summary", "--root", str(repo), "--check"]) == 0
    readme = (repo / "README.md").read_text()
    block = summary.embedded(readme)
    assert (repo / summary.SUMMARY_PATH).read_text().endswith(block)
    assert "| **ResNet18 heatmaps, Adaptive Wing (" in block and "| 5.43 (" in block
    assert "real photos: median NME % (6 faces)" in block
    assert "`../shared/real-photos`, 6 faces in 5 images (reference: human markup 1, dlib's 68 points 5)" in block
    rows = {line.split(" | ")[0]: line for line in block.splitlines() if line.startswith("| ")}
    for i, loss in enumerate(report["losses"]):
        row = next(v for k, v in rows.items() if summary.LOSS_LABELS[loss] in k)
        assert row.endswith(f"| {7.0 + i:.2f} |"), row  # the median of that loss's per-face NME
    assert next(v for k, v in rows.items() if "dlib" in k).endswith("| reference (dlib-marked faces) |")
    assert block.count("On these photos (paired per face, mean NME): ") == len(report["photos"]["comparison"]) >= 1
    # everything outside the markers is untouched
    original = (ROOT / "README.md").read_text()
    assert readme.split(summary.BEGIN)[0] == original.split(summary.BEGIN)[0]
    assert readme.split(summary.END)[1] == original.split(summary.END)[1]


def test_summary_refuses_a_readme_without_markers_in_one_line(tmp_path, capsys):
    repo = _summary_repo(tmp_path)
    (repo / "README.md").write_text("# no markers\n")
    assert cli.main(["summary", "--root", str(repo)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "README.md" in err and summary.BEGIN in err
    assert (repo / "README.md").read_text() == "# no markers\n"


def _exp_show_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    cmds = [c for b in bash_blocks(text) for c in shell_commands(b) if c[:3] == ["dvc", "exp", "show"]]
    assert len(cmds) >= 1, "the README shows no dvc exp show command"
    return cmds


@pytest.mark.slow
def test_readme_dvc_exp_show_fits_120_columns_and_shows_what_changed(tmp_path):
    """A real DVC repository with this project's dvc.yaml, params.yaml and committed metrics, then a second commit
    that changes one param and the metrics: the README's command lists the test NME of each loss and only the changed
    param, in lines of at most 120 characters with nothing cut off."""
    repo = make_repo(tmp_path / "repo", preset=None)
    (repo / "metrics").mkdir(exist_ok=True)
    for f in (ROOT / "metrics").glob("*.json"):
        shutil.copy2(f, repo / "metrics" / f.name)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "metrics")
    report = json.loads((repo / summary.EVAL_PATH).read_text())
    losses = summary.losses_of(report)
    for loss in losses:
        report[loss]["nme_io"] += 0.25
    (repo / summary.EVAL_PATH).write_text(json.dumps(report))
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(re.sub(r"(\n  lr: )[0-9.e-]+", r"\g<1>0.002", params, count=1))
    sh(repo, "git", "commit", "-qam", "lr 2e-3")
    env = {**os.environ, "COLUMNS": "120", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([*_exp_show_commands()[0], "--no-pager", "-n", "2"], cwd=repo, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and max(len(ln) for ln in lines) <= 120, proc.stdout
    assert "…" not in proc.stdout, proc.stdout
    header = lines[1].split()
    assert header[0] == "Experiment" and "train.lr" in header, header
    assert sorted(h for h in header if h.endswith(".nme_io")) == sorted(f"{loss}.nme_io" for loss in losses), header
    assert not any(h.startswith(("augment.", "encode.", "base.", "data.")) for h in header), header
    assert "0.002" in proc.stdout and "0.001" in proc.stdout


def test_mlflow_commands_shown_bind_to_loopback():
    shown = []
    for page in PAGES:
        for block in bash_blocks(page.read_text(encoding="utf-8")):
            for cmd in shell_commands(block):
                if cmd[:2] in (["mlflow", "ui"], ["mlflow", "server"]):
                    shown.append(cmd)
                    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1", (rel(page), cmd)
    assert len(shown) >= 2, shown


def test_readme_dvc_exp_show_keeps_every_params_section():
    """The README's ``--drop`` keeps the columns of every top-level section of params.yaml (a new section would
    otherwise vanish from the comparison) and drops metric columns."""
    import yaml

    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    for cmd in _exp_show_commands():
        drop = re.compile(cmd[cmd.index("--drop") + 1])
        for section in sections:
            assert not drop.match(f"{section}.some_key"), (section, cmd)
        for metric in ("mse.nme_io", "comparison.verdict", "Created", "metrics/train_mse.json:best_val_nme"):
            assert drop.match(metric), (metric, cmd)


def test_every_dvc_exp_run_set_shown_applies_and_validates(tmp_path):
    """Each ``dvc exp run -S key=value ...`` shown, applied by DVC's own override code (Hydra grammar, struct mode:
    an unknown key is refused) to a copy of params.yaml, gives a file that passes the real validation
    (:func:`facemarks.core.params.load_params`), as the stages would check it."""
    from dvc.utils.hydra import apply_overrides

    from facemarks.core.params import load_params

    checked = 0
    for page in PAGES:
        for block in bash_blocks(page.read_text(encoding="utf-8")):
            for cmd in shell_commands(block):
                if cmd[:3] != ["dvc", "exp", "run"]:
                    continue
                sets = [cmd[i + 1] for i, w in enumerate(cmd) if w in ("-S", "--set-param")]
                if not sets:
                    continue
                params = tmp_path / f"params{checked}.yaml"
                shutil.copy2(ROOT / "params.yaml", params)
                try:
                    apply_overrides(params, sets)
                    load_params(params)
                except Exception as exc:  # noqa: BLE001 - the message names the page and the command
                    raise AssertionError(f"{rel(page)}: {shlex.join(cmd)}: {type(exc).__name__}: {exc}") from exc
                checked += 1
    assert checked >= 8, checked


def test_a_wrong_dvc_exp_run_set_is_caught(tmp_path):
    from dvc.utils.hydra import apply_overrides

    from facemarks.core.params import ParamsError, load_params

    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    with pytest.raises(Exception):
        apply_overrides(params, ["train.learning_rate=0.1"])  # no such key
    apply_overrides(params, ["train.lr=-1"])
    with pytest.raises(ParamsError):
        load_params(params)


def test_design_module_table_lists_every_module():
    """docs/design.md's module table names every module of src/facemarks/ that git tracks (what a fresh clone has),
    as ``package.module`` (``cli`` at the top), each package with its one-line docstring, and no module that is gone."""
    section = (ROOT / "docs" / "design.md").read_text(encoding="utf-8").split("## Modules", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `([\w.]+)` \|", section, re.M))
    tracked = tracked_files()
    src = ROOT / "src" / "facemarks"
    files = [p for p in src.rglob("*.py") if p.stem != "__init__"
             and (tracked is None or str(p.relative_to(ROOT)) in tracked)]
    modules = {".".join(p.relative_to(src).with_suffix("").parts) for p in files}
    for package in sorted({p.parent for p in files} - {src}):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"{package.name}/__init__.py: want a one-line docstring"
        assert f"| **`{package.name}`** | *{doc}* |" in section, f"docs/design.md: no row for package {package.name}"
    assert table == modules, f"not in docs/design.md: {sorted(modules - table)}; gone: {sorted(table - modules)}"
