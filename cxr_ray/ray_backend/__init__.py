"""The only package that imports Ray, through Ray's documented APIs only (``PublicAPI`` /
``DeveloperAPI``; no private modules or names). Importing the package imports no Ray; its
modules do.

* :mod:`~cxr_ray.ray_backend.session`: one ``ray_session`` (join a cluster or start a local Ray).
* :mod:`~cxr_ray.ray_backend.ingest`: ``cxr-ray prepare``'s decode as Ray Data tasks.
* :mod:`~cxr_ray.ray_backend.train_launcher`: a run as a ``TorchTrainer`` (DDP over Ray Train
  workers); the worker function is the plain loop plus a handful of Ray calls.
* :mod:`~cxr_ray.ray_backend.data_feed`: ``augment_on = "ray_data"``: Ray Data streams and
  augments a rank's rows on the cluster's CPUs.
* :mod:`~cxr_ray.ray_backend.tune`: the sweep: the Tune trial function (the loop in the
  trial's own process, or a ``TorchTrainer``), callbacks, one Tune experiment per stage.
* :mod:`~cxr_ray.ray_backend.cluster`: what the cluster holds (``max_concurrent_trials = "auto"``).

Everything else in cxr-ray runs without Ray installed.
"""
