"""In-silico experiments on a trained model: MEIs (`mei`), receptive fields (`rf`) and grating
tuning (`tuning`) on a `Subject` (`subject`), checked against the synthetic ground truth
(`truth`). CLI: `python -m v1t_jax.insilico --help`."""

from v1t_jax.insilico.mei import meis
from v1t_jax.insilico.rf import (combined_map, fit_gaussian_2d, gaussian_2d, gradient_at,
                                 receptive_fields, rf_centers)
from v1t_jax.insilico.subject import Subject, evaluate
from v1t_jax.insilico.tuning import grating_tuning, gratings, tuning_summary

__all__ = ["Subject", "combined_map", "evaluate", "fit_gaussian_2d", "gaussian_2d", "gradient_at",
           "grating_tuning", "gratings", "meis", "receptive_fields", "rf_centers",
           "tuning_summary"]
