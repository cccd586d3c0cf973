"""Task functions of the offline test tasks: harness records whose images sit next to this file."""
from pathlib import Path

from evaluation.lmms_bridge import harness_task_functions

_functions = harness_task_functions(Path(__file__).resolve().parent)
doc_to_visual, doc_to_text = _functions.doc_to_visual, _functions.doc_to_text
choice_target, open_results = _functions.choice_target, _functions.open_results
