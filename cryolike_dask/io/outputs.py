"""The one table of output quantities a likelihood run can produce.

Everything that stores, exports or reads results derives from :data:`OUTPUTS`: the results
store's arrays (``results.zarr``), CryoLike's ``.pt`` layout, the lazy graph's outputs, the
per-template arrays, the xarray variables of :func:`cryolike_dask.likelihood` and ``stitch``'s
matrices. Adding an output quantity is one new row here (plus the kernel that computes it).

Each quantity belongs to one *scope*:

* ``"image"``: one value per (structure, image), ``results.zarr/NAME`` ``[n_structures, M]``;
* ``"template"``: one value per (image, template) of a structure,
  ``results.zarr/structure_K/per_template/STEM`` ``[M, S]``;
* ``"full"``: the full tensor ``results.zarr/structure_K/STEM`` ``[M, S, D, W]``.

and is produced by one *source* in the graph: ``"reduction"`` (decoded from the tree reduction
over template blocks), ``"optimal_likelihood"`` (a second pass at the optimal pose),
``"per_template"`` or ``"full"`` (taken from each kernel block's result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The selectable outputs (:class:`~cryolike_dask.pipeline.spec.OutputRequest` flags) and the
#: bit each sets in the results store's done mask once a block holds it.
FLAG_BITS: dict[str, int] = {
    "optimal_pose": 1,
    "integrated": 2,
    "optimal_likelihood": 4,
    "per_template": 8,
    "full": 16,
    "pose_prior": 32,
}

#: Leading dimensions of each scope (per structure for ``template`` and ``full``).
SCOPE_DIMS: dict[str, tuple[str, ...]] = {
    "image": ("structure", "image"),
    "template": ("image", "template"),
    "full": ("image", "template", "displacement", "rotation"),
}


@dataclass(frozen=True)
class Quantity:
    """One output quantity.

    Attributes
    ----------
    name : str
        Unique name: the xarray variable and, for scope ``image``, the results-store array.
    scope : str
        ``"image"``, ``"template"`` or ``"full"`` (see the module docstring).
    source : str
        Which part of the graph computes it.
    kind : str
        ``"float"`` (the run's real dtype) or ``"int"`` (int64).
    fill : float or int
        Value of entries not computed yet.
    folder, stem : str
        CryoLike's layout: ``OUT/templateN/FOLDER/STEM_stack_SSSSSS.pt``.
    requires : tuple of str
        The :data:`FLAG_BITS` flags that must all be requested for it to be written.
    units : str
    description : str
    matrix : str or None
        Name of ``stitch``'s ``[n_structures, n_images]`` matrix built from it.
    """

    name: str
    scope: str
    source: str
    kind: str
    fill: float | int
    folder: str
    stem: str
    requires: tuple[str, ...]
    units: str
    description: str
    matrix: str | None = None

    @property
    def bits(self) -> int:
        """Done bits a block must hold for this quantity to be complete."""
        out = 0
        for flag in self.requires:
            out |= FLAG_BITS[flag]
        return out

    @property
    def dims(self) -> tuple[str, ...]:
        """Dimensions in the results store (per structure for ``template`` / ``full``)."""
        return SCOPE_DIMS[self.scope]

    @property
    def store_path(self) -> str:
        """Path of the array inside ``results.zarr`` (``{k}`` stands for the structure)."""
        if self.scope == "image":
            return self.name
        if self.scope == "template":
            return f"structure_{{k}}/per_template/{self.stem}"
        return f"structure_{{k}}/{self.stem}"

    @property
    def file_key(self) -> str:
        """Key of the file in a stack's completion record and :meth:`OutputLayout.stack_files`."""
        return f"{self.folder}/{self.stem}"


def _q(*args, **kwargs) -> Quantity:
    return Quantity(*args, **kwargs)


_NAN = math.nan
OUTPUTS: tuple[Quantity, ...] = (
    _q("cross_correlation", "image", "reduction", "float", _NAN,
       "cross_correlation", "cross_correlation", ("optimal_pose",), "",
       "best normalised cross-correlation over templates, displacements and rotations",
       matrix="cross_correlation_matrix"),
    _q("optimal_template", "image", "reduction", "int", -1,
       "optimal_pose", "optimal_template", ("optimal_pose",), "",
       "index of the best template (viewing direction)"),
    _q("optimal_displacement_x", "image", "reduction", "float", _NAN,
       "optimal_pose", "optimal_displacement_x", ("optimal_pose",), "Å",
       "x displacement of the best pose"),
    _q("optimal_displacement_y", "image", "reduction", "float", _NAN,
       "optimal_pose", "optimal_displacement_y", ("optimal_pose",), "Å",
       "y displacement of the best pose"),
    _q("optimal_inplane_rotation", "image", "reduction", "float", _NAN,
       "optimal_pose", "optimal_inplane_rotation", ("optimal_pose",), "rad",
       "in-plane rotation of the best pose"),
    _q("log_likelihood_integrated_fourier", "image", "reduction", "float", _NAN,
       "log_likelihood", "log_likelihood_integrated_fourier", ("integrated",), "nat",
       "log-likelihood marginalised over templates (log-normalised viewing weights), "
       "displacements and rotations",
       matrix="integrated_fourier_log_likelihood_matrix"),
    _q("log_likelihood_optimal_fourier", "image", "optimal_likelihood", "float", _NAN,
       "log_likelihood", "log_likelihood_optimal_fourier", ("optimal_likelihood",), "nat",
       "log-likelihood at the optimal pose",
       matrix="optimal_fourier_log_likelihood_matrix"),
    _q("optimal_pose_on_window_edge", "image", "reduction", "int", -1,
       "optimal_pose", "optimal_pose_on_window_edge", ("optimal_pose", "pose_prior"), "",
       "1 where the best pose lies on the edge of the prior's window (search around prior "
       "poses)"),
    _q("evaluated_poses", "image", "reduction", "int", -1,
       "optimal_pose", "evaluated_poses", ("optimal_pose", "pose_prior"), "",
       "(template, displacement, rotation) poses evaluated for the image (search around "
       "prior poses)"),
    _q("per_template_cross_correlation", "template", "per_template", "float", _NAN,
       "per_template", "cross_correlation", ("per_template",), "",
       "best cross-correlation over displacements and rotations per template"),
    _q("per_template_optimal_displacement_x", "template", "per_template", "float", _NAN,
       "per_template", "optimal_displacement_x", ("per_template",), "Å",
       "x displacement of the best pose per template"),
    _q("per_template_optimal_displacement_y", "template", "per_template", "float", _NAN,
       "per_template", "optimal_displacement_y", ("per_template",), "Å",
       "y displacement of the best pose per template"),
    _q("per_template_optimal_inplane_rotation", "template", "per_template", "float", _NAN,
       "per_template", "optimal_inplane_rotation", ("per_template",), "rad",
       "in-plane rotation of the best pose per template"),
    _q("per_template_log_likelihood_integrated_fourier", "template", "per_template", "float",
       _NAN, "per_template", "log_likelihood_integrated_fourier",
       ("per_template", "integrated"), "nat",
       "log-likelihood marginalised over displacements and rotations per template"),
    _q("cross_correlation_pose_msdw", "full", "full", "float", _NAN,
       "cross_correlation", "cross_correlation_pose_msdw", ("full",), "",
       "cross-correlation of every (image, template, displacement, rotation)"),
)  # fmt: skip

BY_NAME: dict[str, Quantity] = {q.name: q for q in OUTPUTS}


def quantity(name: str) -> Quantity:
    """The quantity called ``name`` (``KeyError`` naming the known ones otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown output quantity {name!r}; known: {', '.join(BY_NAME)}") from None


def selected(flags: dict[str, bool]) -> tuple[Quantity, ...]:
    """The quantities whose required flags are all set in ``flags``, in table order."""
    return tuple(q for q in OUTPUTS if all(flags.get(f, False) for f in q.requires))


def matrices() -> tuple[Quantity, ...]:
    """The quantities ``stitch`` turns into ``[n_structures, n_images]`` matrices."""
    return tuple(q for q in OUTPUTS if q.matrix is not None)


__all__ = ["BY_NAME", "FLAG_BITS", "OUTPUTS", "SCOPE_DIMS", "Quantity", "matrices", "quantity"]
