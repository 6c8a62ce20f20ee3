"""In-silico experiments on a trained model: MEIs, receptive fields and grating tuning
(`experiments`), checked against the synthetic ground truth (`truth`); CLI: `python -m
v1t_jax.insilico --help`."""

from v1t_jax.insilico.experiments import (Subject, evaluate, fit_gaussian_2d, gradient_at,
                                          grating_tuning, gratings, meis, receptive_fields)

__all__ = ["Subject", "evaluate", "fit_gaussian_2d", "gradient_at", "grating_tuning", "gratings",
           "meis", "receptive_fields"]
