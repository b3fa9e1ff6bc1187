"""Apply an experiment's trained classifiers to new X-rays (``cxr-ray predict``): no Ray here.

* :mod:`~cxr_ray.predict.select`: which checkpoint and threshold each cohort uses;
* :mod:`~cxr_ray.predict.inputs`: the input list and reading one file (PNG or DICOM);
* :mod:`~cxr_ray.predict.engine`: every cohort's model loaded once, probabilities and Grad-CAM;
* :mod:`~cxr_ray.predict.output`: ``preds.csv``, heatmap overlays, external-validation metrics.

Ray Data runs them on a cluster (:mod:`cxr_ray.ray_backend.infer`);
:func:`~cxr_ray.predict.output.predict_in_process` runs the same steps in one process.
"""
