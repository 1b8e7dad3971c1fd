"""``python -m theory``: regenerate ``theory/figures/*.png`` and ``tightness.md`` and print the results table."""

import sys

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import jax  # noqa: E402

from ascent_jax.cli import run_main  # noqa: E402

from .report import main  # noqa: E402

if __name__ == "__main__":
    # A separate process, so float64 can be switched on for the whole run.
    jax.config.update("jax_enable_x64", True)
    sys.exit(run_main(main))
