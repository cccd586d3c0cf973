"""MkDocs hook: serve the repository's figures (``figures/*.png``) with the site, so pages show the figures the
full demo made without keeping a second copy under ``docs/``. Runs offline; nothing is downloaded."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def on_files(files, config):
    """Add every PNG of ``figures/`` at ``figures/NAME.png`` in the site."""
    for path in sorted((ROOT / "figures").glob("*.png")):
        files.append(File(f"figures/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
