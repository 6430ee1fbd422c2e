"""ShapesEval: GenEval's six tasks on the procedural shapes world, scored from pixels.

GenEval (SPEC section 8) checks generated images with a COCO detector and CLIP colour classification;
neither can be installed offline, and the shapes world needs neither: :mod:`~lens_jax.eval.detector`
finds (colour, shape, box) from pixels by analysis by synthesis, and :mod:`~lens_jax.eval.scoring`
applies GenEval's rules. Items (:mod:`~lens_jax.eval.tasks`) are held-out scenes with a short
GenEval-style prompt and a dense prompt; :mod:`~lens_jax.eval.runner` generates and scores them;
``python -m lens_jax.eval --weights WORKDIR --out DIR`` runs it all.
"""

from lens_jax.eval.detector import Detection, detect
from lens_jax.eval.runner import (evaluate, generate_images, ground_truth_generate_fn, pipeline_generate_fn,
                                  render_ground_truth, save_grid, score_images, write_json)
from lens_jax.eval.scoring import check, format_summary, score_image, score_image_detailed, summarize
from lens_jax.eval.tasks import (EVAL_STREAM, RELATIONS, TASKS, EvalItem, make_eval_items, make_item,
                                 relative_position, scene_config_from_dict, task_notes, unavailable_tasks)

__all__ = [
    "Detection", "detect", "evaluate", "generate_images", "ground_truth_generate_fn", "pipeline_generate_fn",
    "render_ground_truth", "save_grid", "score_images", "write_json", "check", "format_summary", "score_image",
    "score_image_detailed", "summarize", "EVAL_STREAM", "RELATIONS", "TASKS", "EvalItem", "make_eval_items",
    "make_item", "relative_position", "scene_config_from_dict", "task_notes", "unavailable_tasks",
]
