"""Chat templates rendered within a time limit: a model folder's template is untrusted code.

A chat template (``chat_template`` in a tokenizer or processor config, or ``chat_template.jinja``) runs in
transformers' jinja sandbox, which blocks attribute escapes but not loops: ``range(100000)`` nested twice
never returns. Every prompt this toolkit builds goes through :func:`render_chat`, which stops a render that
runs longer than :data:`TEMPLATE_SECONDS` and turns anything the template raises (a sandbox
``SecurityError``, its own ``raise_exception``) into one :class:`~pruning.errors.ChatTemplateError` line.

The limit is a ``SIGALRM`` timer, so it applies on the main thread of a POSIX process (where the CLI, its
worker processes and the tests render); elsewhere (another thread) the template renders without one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Iterator

from .errors import ChatTemplateError

TEMPLATE_SECONDS = 10.0  # a real chat template renders in milliseconds; one looping this long is hostile


class _TemplateTimeout(Exception):
    """Raised inside the render by the timer's signal handler."""


def template_source(processor) -> str:
    """Where a processor's chat template comes from, for messages: its model folder or Hub id."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return str(getattr(tokenizer, "name_or_path", "") or type(processor).__name__)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_TemplateTimeout` in this block after ``seconds`` (main thread with SIGALRM only); any
    timer set before is restored afterwards with what remained of it."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    delay, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - started), 1e-3), interval)


def render_chat(processor, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """``processor.apply_chat_template(messages, tokenize=False, **kwargs)`` stopped after
    :data:`TEMPLATE_SECONDS`; a template that loops too long or raises is one ChatTemplateError naming it."""
    import jinja2

    try:
        with _time_limit(TEMPLATE_SECONDS):
            return processor.apply_chat_template(messages, tokenize=False, **kwargs)
    except _TemplateTimeout:
        raise ChatTemplateError(f"the chat template of {template_source(processor)!r} did not finish within "
                                f"{TEMPLATE_SECONDS:g} s (a loop that never ends?); fix or replace the model's "
                                "chat template") from None
    except (MemoryError, OverflowError) as err:  # e.g. a string multiplied by a huge number
        raise ChatTemplateError(f"the chat template of {template_source(processor)!r} built a value too large to "
                                f"hold ({type(err).__name__}); fix or replace the model's chat template") from None
    except jinja2.TemplateError as err:
        kind = "the jinja sandbox refused" if isinstance(err, jinja2.exceptions.SecurityError) else "failed on"
        raise ChatTemplateError(f"{kind} the chat template of {template_source(processor)!r} "
                                f"({' '.join(str(err).split())}); fix or replace the model's chat template") from None
