"""``python -m theory``: regenerate ``theory/figures/*.png`` and ``tightness.md`` and print the results table."""

import sys

import jax

from ascent_jax.cli import run_main

from .report import main

if __name__ == "__main__":
    # A separate process, so float64 can be switched on for the whole run.
    jax.config.update("jax_enable_x64", True)
    sys.exit(run_main(main))
