"""Ctrl-C for the command-line tools (``kvjax.launch``, ``ports.convert``): acted on at once.

Python runs signal handlers only between bytecodes of the main thread, so a KeyboardInterrupt
waits while the main thread is inside C code (XLA compiling for minutes at 1.3B, torch.load, a
large copy), and once raised it lands wherever the main thread is (a gc callback swallows it;
tearing the interpreter down under XLA's threads crashed). ``watch`` instead routes SIGINT
through ``signal.set_wakeup_fd``: the C-level handler writes the signal number to a pipe at once
and a watcher thread calls the tool's handler, which removes partial output and ends the process
with ``exit_interrupted`` (``os._exit``: no teardown). Standard library only, so a tool can
install it before its heavy imports.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, NoReturn

EXIT_INTERRUPTED = 130
MESSAGE = 'interrupted; nothing written'


def watch(on_interrupt: Callable[[], None], name: str) -> None:
  """Calls ``on_interrupt()`` on a watcher thread for every SIGINT; the main thread runs on.

  Must be called from the main thread (it sets the SIGINT handler and the wakeup fd).
  """
  r, w = os.pipe()
  os.set_blocking(w, False)
  signal.set_wakeup_fd(w)
  signal.signal(signal.SIGINT, lambda *_: None)   # the watcher acts; the main thread runs on

  def loop():
    while True:
      if signal.SIGINT in os.read(r, 64):        # the numbers of the signals received
        on_interrupt()

  threading.Thread(target=loop, name=name, daemon=True).start()


def exit_interrupted(message: str = MESSAGE) -> NoReturn:
  """Prints ``message`` as one line on stderr (after a newline on a terminal, where a progress
  bar may hold the line) and exits with status 130 at once."""
  sys.stderr.write(('\n' if sys.stderr.isatty() else '') + message + '\n')
  sys.stderr.flush()
  os._exit(EXIT_INTERRUPTED)
