import sys

from lens_jax.data.caption.cli import main

sys.exit(main())
