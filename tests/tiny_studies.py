"""Small study inputs shared by the study tests: a tiny LLaVA with calibration batches and a question benchmark
(in memory), or the same as files on disk for the command line."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_models import build_tiny
from tiny_processors import make_processor, save_model_dir, write_calibration


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def in_memory_study(folder: Path, fidelity_texts: tuple[str, ...]) -> tuple:
    """(model, processor, calibration batches, [look.jsonl, fidelity.jsonl]): four 16x16 random images with a
    three-option question each, and a fidelity benchmark of ``fidelity_texts``."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append({"id": f"q{i}", "image": f"images/{i}.png", "question": "what is shown here",
                      "options": ["cat", "dog", "red"], "answer": ["cat", "dog", "red", "cat"][i]})
    look = _write_jsonl(folder / "look.jsonl", lines)
    texts = [{"id": f"t{i}", "text": text} for i, text in enumerate(fidelity_texts)]
    fidelity = _write_jsonl(folder / "fidelity.jsonl", texts)
    model, _ = build_tiny("llava", seed=0)
    calibration = [build_tiny("llava", seed=s, batch=2, padded=True)[1] for s in (1, 2)]
    return model, make_processor("llava", model), calibration, [look, fidelity]


@dataclass
class StudyFiles:
    """A tiny LLaVA saved as a model folder, 3 calibration conversations with their images, a two-option question
    benchmark on those images and a one-text fidelity benchmark."""

    tmp: Path
    model: Path
    calib: Path
    images: Path
    bench: Path
    fidelity: Path

    def args(self, *benches: Path) -> list[str]:
        """`atv probe` arguments for these files (3 calibration samples), the benchmarks ``benches``."""
        return ["--model", str(self.model), "--calib", str(self.calib), "--images", str(self.images),
                "--bench", *map(str, benches), "--nsamples", "3"]


def study_files(tmp: Path) -> StudyFiles:
    model, _ = build_tiny("llava")
    model_dir = save_model_dir("llava", model, tmp / "model")
    calib, images = write_calibration(tmp / "calib", n=3)
    bench = _write_jsonl(tmp / "look.jsonl", [
        {"id": f"q{i}", "image": f"calib/images/{i}.png", "question": "what is shown here",
         "options": ["cat", "dog"], "answer": ["cat", "dog", "cat"][i]} for i in range(3)])
    fidelity = _write_jsonl(tmp / "fid.jsonl", [{"id": "t", "text": "the red cat is here"}])
    return StudyFiles(tmp, model_dir, calib, images, bench, fidelity)
