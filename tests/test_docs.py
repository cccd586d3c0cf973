"""The documentation cannot drift from the code.

- The site builds with ``mkdocs build --strict`` (a broken link or anchor, a missing page or reference, a
  griffe docstring warning fails it).
- Every ``bash`` and ``python`` block of the README and of ``docs/`` carries a marker on the line before its
  fence, and the marker says what this test does with it:

  ``<!-- docs-test: tiny [uses=A,B] -->``  run it on a tiny random LLaVA: the model ids, calibration files,
      image folders and benchmark files the docs name are replaced by tiny ones (:meth:`Tiny.tokens`), sample
      counts capped at 3 (``--nsamples 3`` added where a command keeps the default 128); ``uses=`` copies
      outputs the README's blocks wrote (``pruned/atv-50``, ``runs/probe``) into the page's folder first.
      Python blocks also find ``model``, ``processor``, ``batches`` and ``calibration_batches`` defined (a
      fresh tiny model and its calibration batches).
  ``<!-- docs-test: run -->``  run it as written.
  ``<!-- docs-test: skip REASON -->``  not run (GPUs, Hub downloads, installs); :data:`DECLARED_SKIPS`
      holds how many each page has, so a block cannot start skipping unnoticed.

- Every ``atv`` command in a bash block, run or skipped, is parsed by the real parser.

Each page's blocks run in order in a folder of their own (the README's first), as a reader would run them;
``atv`` commands run in this process through :func:`atv.cli.main`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
RUN_LANGS = ("bash", "python")
MARKER = re.compile(r"^<!-- docs-test: (skip|tiny|run)\b(.*?)-->$")

# blocks each page declares it does not run (every one has its reason in its marker)
DECLARED_SKIPS = {
    "README.md": 3,                          # the two commands (installs), the GPU install
    "docs/getting-started.md": 4,            # the two commands, the GPU install, the site build
    "docs/guides/cluster.md": 2,             # Ray on GPUs, a Slurm array
    "docs/guides/evaluate.md": 2,            # lmms-eval tasks from the Hub, several processes
    "docs/guides/figures.md": 1,             # a full demo's results
    "docs/guides/large-models.md": 3,        # 7B and 72B checkpoints on GPUs
    "docs/guides/share.md": 1,               # an upload to the Hub
    "docs/results/performance.md": 2,        # the benchmarks, the evaluation benchmark
}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    kind: str | None  # skip | tiny | run, None when unmarked
    detail: str  # the rest of the marker (skip: the reason; tiny: uses=...)

    @property
    def uses(self) -> list[str]:
        found = re.search(r"uses=(\S+)", self.detail)
        return found.group(1).split(",") if found else []

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    """Every fenced block of ``page`` in a language of :data:`RUN_LANGS`, with its marker."""
    lines = (ROOT / page).read_text(encoding="utf-8").split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        if fence.group(2) in RUN_LANGS:
            marker = MARKER.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(page, i + 1, fence.group(2), "\n".join(lines[i + 1:end]),
                                marker.group(1) if marker else None, marker.group(2).strip() if marker else ""))
        i = end + 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split as the shell would."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def atv_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``atv`` (or ``... -m atv.cli``) of a command, else None."""
    if argv[0] == "atv":
        return argv[1:]
    if "atv.cli" in argv and argv[argv.index("atv.cli") - 1] == "-m":
        return argv[argv.index("atv.cli") + 1:]
    return None


# -- the site ------------------------------------------------------------------------------------------------
def test_site_builds_in_strict_mode(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (pip install -e '.[docs]')")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "pruning" / "index.html").is_file()
    families = (tmp_path / "site" / "families" / "index.html").read_text(encoding="utf-8")
    generated = (ROOT / "benchmarks" / "results" / "families.md").read_text(encoding="utf-8")
    first_type = generated.splitlines()[2].split("|")[1].strip()  # the generated table is embedded, not copied
    assert f"<td>{first_type}</td>" in families
    assert time.monotonic() - start < 120


# -- the blocks ----------------------------------------------------------------------------------------------
ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def test_every_block_says_what_the_tests_do_with_it():
    unmarked = [str(b) for b in ALL_BLOCKS if b.kind is None]
    assert not unmarked, f"bash/python blocks without a <!-- docs-test: ... --> marker: {unmarked}"
    assert all(b.detail for b in ALL_BLOCKS if b.kind == "skip"), "a skipped block must say why"


def test_skipped_blocks_are_the_declared_ones():
    skipped = Counter(b.page for b in ALL_BLOCKS if b.kind == "skip")
    assert dict(skipped) == DECLARED_SKIPS


def test_readme_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -c " \
           "constraints.txt -e \".[dev]\" && atv demo --quick" in readme
    assert "python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup_env.sh && python -m ruff check . " \
           "&& python -m pytest -q" in readme
    assert len(readme.splitlines()) <= 200


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "bash"], ids=str)
def test_every_atv_command_parses(block):
    from atv.cli import build_parser

    for argv in commands(block.code):
        rest = atv_argv(argv)
        if rest is None:
            continue
        if "--recipe" in rest and "--model" not in rest:  # the recipe file gives --model when the command runs
            rest = [*rest, "--model", "from-the-recipe"]
        build_parser().parse_args(rest)  # SystemExit on an unknown flag or a bad value


# -- running them on tiny models -----------------------------------------------------------------------------
@dataclass
class Tiny:
    model: Path
    calib: Path
    images: Path
    look: Path
    textmc: Path
    dense: Path

    def tokens(self) -> dict[str, str]:
        """What the docs name -> the tiny stand-in."""
        return {**dict.fromkeys(("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-1.5-7b-hf", "your-org/your-lvlm",
                                 "DIR"), str(self.model)),
                **dict.fromkeys(("sharegpt4v.json", "calib.json"), str(self.calib)),
                **dict.fromkeys(("path/to/images", "images/", "IMAGES"), str(self.images)),
                **dict.fromkeys(("a.jsonl", "bench/look.jsonl", "suite/digit.jsonl"), str(self.look)),
                **dict.fromkeys(("b.jsonl", "suite/text-mc.jsonl"), str(self.textmc)),
                "dense.json": str(self.dense)}


MAX_SAMPLES = 3  # the tiny calibration file's records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """A tiny LLaVA folder, 4 calibration conversations with images, a 32-question image benchmark (enough
    prompts for the sensitivity map's default), a text-only multiple-choice benchmark, and a dense run's JSON."""
    from tiny_models import build_tiny
    from tiny_processors import save_model_dir, write_calibration

    from atv.cli import main

    root = tmp_path_factory.mktemp("docs-tiny")
    model, _ = build_tiny("llava")
    model_dir = save_model_dir("llava", model, root / "model")
    calib, images = write_calibration(root / "calib", n=4)
    look = root / "calib" / "look.jsonl"
    look.write_text("".join(json.dumps({"id": f"q{i}", "image": f"images/{i % 4}.png", "question": "what is shown here",
                                        "options": ["cat", "dog"], "answer": ["cat", "dog"][i % 2]}) + "\n"
                            for i in range(32)))
    textmc = root / "textmc.jsonl"
    textmc.write_text("".join(json.dumps({"id": f"t{i}", "image": None, "question": f"Is {i} even or odd?",
                                          "options": ["even", "odd"], "answer": ["even", "odd"][i % 2]}) + "\n"
                              for i in range(4)))
    dense = root / "dense.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", str(look), str(textmc), "--out", str(dense)]) == 0
    return Tiny(model_dir, calib, images, look, textmc, dense)


def tiny_command(argv: list[str], tiny: Tiny) -> list[str]:
    tokens = tiny.tokens()
    out = [tokens.get(arg, arg) for arg in argv]
    for i, arg in enumerate(out[:-1]):
        if arg == "--nsamples":
            out[i + 1] = str(min(int(out[i + 1]), MAX_SAMPLES))
    if {"prune", "probe"} & set(out[:2]) and "--nsamples" not in out:  # the default, 128, is more than there are
        out += ["--nsamples", str(MAX_SAMPLES)]
    return out


def tiny_python(code: str, tiny: Tiny) -> str:
    for name, path in tiny.tokens().items():
        code = code.replace(f'"{name}"', repr(path))
    return re.sub(r"nsamples=\d+", f"nsamples={MAX_SAMPLES}", code)


def tiny_namespace(tiny: Tiny) -> dict:
    """What a tiny python block finds defined: a fresh tiny model, its processor and calibration batches."""
    from pruning.data import load_llava_conversations
    from pruning.io import load_model

    model, processor = load_model(tiny.model)
    batches, _ = load_llava_conversations(tiny.calib, tiny.images, processor, nsamples=MAX_SAMPLES)
    return {"model": model, "processor": processor, "batches": batches, "calibration_batches": batches}


def registries() -> list[dict]:
    """The registries a block may add to (a scorer, a method, an adapter): restored after each block."""
    from pruning import adapters, config, registry

    return [registry.SCORERS, registry.POOLS, config.METHOD_CONFIGS, adapters._REGISTRY]


def run_block(block: Block, tiny: Tiny, capsys) -> None:
    from atv.cli import main

    if block.lang == "bash":
        for argv in commands(block.code):
            rest = atv_argv(argv)
            assert rest is not None, f"{block}: only atv commands run here; mark the block skip, with a reason"
            if block.kind == "tiny":
                rest = tiny_command(rest, tiny)
            code = main(rest)
            assert code == 0, f"{block}: {shlex.join(argv)} exited {code}: {capsys.readouterr().err[-2000:]}"
        return
    source = tiny_python(block.code, tiny) if block.kind == "tiny" else block.code
    namespace = {"__name__": "__docs__", **(tiny_namespace(tiny) if block.kind == "tiny" else {})}
    saved = [dict(r) for r in registries()]
    try:
        exec(compile(source, str(block), "exec"), namespace)
    finally:
        for registry, before in zip(registries(), saved):
            registry.clear()
            registry.update(before)


def run_page(page: str, folder: Path, tiny: Tiny, capsys, monkeypatch, readme: Path | None) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    ran = 0
    for block in read_blocks(page):
        if block.kind not in ("tiny", "run"):
            continue
        for used in block.uses:
            assert readme is not None and (readme / used).exists(), f"{block}: uses={used}, which the README writes"
            if not (folder / used).exists():
                shutil.copytree(readme / used, folder / used, symlinks=True)
        run_block(block, tiny, capsys)
        ran += 1
    return ran


@pytest.fixture(scope="module")
def readme_folder(tiny, tmp_path_factory) -> Path:
    """The README's blocks, run once: their outputs (pruned/atv-50, runs/probe) are what other pages use."""
    folder = tmp_path_factory.mktemp("docs-run") / "README"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_page("README.md", folder, tiny, _NoCapture(), monkeypatch, None) == 4
    return folder


class _NoCapture:
    """Stands in for capsys in the module fixture (pytest's own capture keeps the output)."""

    def readouterr(self):
        return type("Captured", (), {"out": "", "err": "(see the captured output)"})()


def test_readme_blocks_run_on_a_tiny_model(readme_folder):
    assert (readme_folder / "pruned" / "atv-50" / "prune_report.json").is_file()
    assert (readme_folder / "runs" / "probe" / "results.jsonl").is_file()
    assert (readme_folder / "llava-atv-50" / "config.json").is_file()


@pytest.mark.parametrize("page", [p for p in PAGES if p != "README.md"
                                  and any(b.kind in ("tiny", "run") for b in read_blocks(p))])
def test_page_blocks_run_on_a_tiny_model(page, tiny, readme_folder, tmp_path, capsys, monkeypatch):
    assert run_page(page, tmp_path / Path(page).stem, tiny, capsys, monkeypatch, readme_folder) > 0


# -- the README's links and the citation ---------------------------------------------------------------------
def test_readme_links_and_figure_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert any(t.startswith("docs/") for t in local) and "figures/sensitivity.png" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert "https://arxiv.org/abs/2603.16001" in readme and "@inproceedings{" in readme


def test_citation_file_is_cff_1_2():
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] and cff["message"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2026 and paper["authors"]
    assert "2603.16001" in paper["url"]
    for author in cff["authors"] + paper["authors"]:
        assert "name" in author or "family-names" in author  # an entity or a person, as CFF requires
