"""``python -m theory``: regenerate ``theory/figures/*.png`` and print the results table."""

import jax

from .report import main

if __name__ == "__main__":
    # A separate process, so float64 can be switched on for the whole run.
    jax.config.update("jax_enable_x64", True)
    main()
