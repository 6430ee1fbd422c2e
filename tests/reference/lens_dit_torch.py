from lens_jax.convert.reference.lens_dit_torch import *  # noqa: F401,F403  (moved; kept for old imports)
