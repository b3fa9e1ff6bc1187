"""Training without Ray: what a run trains (:mod:`.config`), the rank loop (:mod:`.loop`),
its data (:mod:`.feed`), files (:mod:`.runlog`, :mod:`.checkpoint`), the LR range test as
the loop runs it (:mod:`.lr_find`) and a run from start to summary, in process
(:mod:`.run`). The Ray Train launcher is :mod:`cxr_ray.ray_backend.train_launcher`.
"""

from cxr_ray.train.checkpoint import find_checkpoint, load_checkpoint
from cxr_ray.train.config import SCORE_METRICS, RunPlan, TrainConfig, plan_run, steps_per_epoch
from cxr_ray.train.lr_find import LrFindSpec
from cxr_ray.train.run import TrainSummary, fit_in_process, lr_find_in_process

__all__ = ["LrFindSpec", "RunPlan", "SCORE_METRICS", "TrainConfig", "TrainSummary",
           "find_checkpoint", "fit_in_process", "load_checkpoint", "lr_find_in_process",
           "plan_run", "steps_per_epoch"]
