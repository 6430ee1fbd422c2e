"""One Orbax CheckpointManager per workdir: items `state`, `config`, `data` (the Grain iterator).

Saves are asynchronous and atomic (an unfinished save stays in a `*.orbax-checkpoint-tmp` folder
that `latest_step()` ignores and the next run cleans up). Restores take abstract targets that carry
the shardings of the *current* mesh, so a run can resume on a different mesh shape.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp

ITEMS = ("state", "config", "data")


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
            item_names=ITEMS,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, config: dict, data_iterator=None, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """Restore the state into the shardings carried by `abstract_state`; the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params_only(directory: str | pathlib.Path, abstract_params: Any, step: int | None = None) -> Any:
    """Partial restore of `state.params` from a workdir's checkpoints (for `init_from`).

    Also reads converted checkpoints (lens_jax.convert), which may store bf16/fp16: every array is
    cast to the dtype (and placed in the sharding) of its `abstract_params` leaf.
    """
    directory = pathlib.Path(directory).absolute()
    ckpt_dir = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"init_from: no finished checkpoint under {ckpt_dir}")
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True))
    )
    manager.close()
    return restored["state"]["params"]
