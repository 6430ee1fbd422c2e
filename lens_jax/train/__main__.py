"""python -m lens_jax.train --config configs/tiny.py --workdir DIR [--config.FIELD=VALUE ...]"""

from __future__ import annotations

import os
import sys


def main(argv):
    from absl import flags

    from lens_jax import config as config_lib
    from lens_jax.parallel.distributed import maybe_initialize_distributed
    from lens_jax.train.loop import train

    from absl import logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO: keep the console to the progress bar
        logging.set_verbosity(logging.WARNING)
    maybe_initialize_distributed()
    cfg = config_lib.validate(FLAGS.config)
    last = train(cfg, FLAGS.workdir, max_steps_this_run=FLAGS.max_steps_this_run)
    import jax

    if jax.process_index() == 0:
        print(f"workdir: {os.path.abspath(FLAGS.workdir)}")
        print(f"metrics: {os.path.join(os.path.abspath(FLAGS.workdir), 'metrics.jsonl')}")
        print(f"samples: {os.path.join(os.path.abspath(FLAGS.workdir), 'samples', 'latest.png')}")
        if last:
            print(f"last logged: step {last['step']} loss {last['loss']:.5f}")


def run():
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).")
    flags.DEFINE_integer("max_steps_this_run", None, "Stop after this many steps of this invocation (resumable).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
