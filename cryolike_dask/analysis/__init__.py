"""Analyses of a finished likelihood run (pure array math; no Dask, Zarr or torch).

* :mod:`~cryolike_dask.analysis.reweight` - ensemble weights of structures from an
  images × structures likelihood matrix: EM with a certificate, an exact Gibbs sampler,
  a Laplace approximation, the bootstrap and K-fold cross-validation;
* :mod:`~cryolike_dask.analysis.mcmc` - split-R-hat and effective sample sizes.
"""
