"""MkDocs hooks (offline; nothing is downloaded).

- Serve the repository's figures (``figures/*.png``) with the site, so pages show the figures the full demo
  made without a second copy under ``docs/``.
- Embed generated Markdown files where a page says ``<!-- embed: PATH -->`` (PATH from the repository root),
  e.g. the supported-families table ``scripts/families_table.py`` writes. Square brackets are escaped: the
  table's ``[q_proj, k_proj]`` groups are not links. A missing file fails the build.
"""

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
EMBED = re.compile(r"^<!-- embed: (\S+) -->$", re.MULTILINE)


def on_files(files, config):
    """Add every PNG of ``figures/`` at ``figures/NAME.png`` in the site."""
    for path in sorted((ROOT / "figures").glob("*.png")):
        files.append(File(f"figures/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def _embedded(match: re.Match) -> str:
    path = ROOT / match.group(1)
    if not path.is_file():
        raise PluginError(f"docs: <!-- embed: {match.group(1)} --> names no file")
    return path.read_text(encoding="utf-8").replace("[", "\\[").replace("]", "\\]")


def on_page_markdown(markdown, page, config, files):
    """Replace each ``<!-- embed: PATH -->`` line by the file's text."""
    return EMBED.sub(_embedded, markdown)
