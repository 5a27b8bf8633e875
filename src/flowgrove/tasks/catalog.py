"""The table of embedded tasks: name -> one-line summary (``flowgrove tasks``; the choices of the ``task`` key).

What a task sets (policy, prompts, rewards, judges) is its config layer ``config/tasks/<name>.yaml``; a test checks
that every name here has one.
"""

from __future__ import annotations

DEFAULT_TASK = "digits"

TASKS = {
    "digits": "sklearn 8x8 handwritten digits, 'a handwritten seven'; rewards digit_classifier + boldness",
    "numbers": "two-digit numbers 00..99 on 8x16 images, 'the number 47'; OCR reward, held-out on 20 unseen numbers",
}
