"""CryoLike's folder layouts (spec §14): template lists, particle stacks, likelihood outputs.

Inputs::

    TEMPLATES/template_file_list.npy        paths of the template files (one per structure)
    TEMPLATES/templates_fourier_NAME.pt     complex [S, N, W]
    PARTICLES/fft/particles_fourier_stack_NNNNNN.pt    complex [n, N, W]
    PARTICLES/fft/particles_fourier_stack_NNNNNN.npz   image + lens parameters

Outputs (``OUT``; ``N`` = template file index, ``SSSSSS`` = stack index)::

    OUT/displacements_set.pt
    OUT/templateN/cross_correlation/cross_correlation_stack_SSSSSS.pt
    OUT/templateN/cross_correlation/cross_correlation_pose_msdw_stack_SSSSSS.pt
    OUT/templateN/optimal_pose/optimal_{template,displacement_x,displacement_y,inplane_rotation}_stack_SSSSSS.pt
    OUT/templateN/log_likelihood/log_likelihood_{integrated,optimal}_fourier_stack_SSSSSS.pt
    OUT/templateN/per_template/{...}_stack_SSSSSS.pt                 ([M_stack, S], ours)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.io.outputs import Quantity
from cryolike_dask.io.torch_files import load_tensor
from cryolike_dask.params.image import ImageParameters
from cryolike_dask.params.lens import LensParameters
from cryolike_dask.params.npz import ParameterFileError, read_npz

TEMPLATE_LIST = "template_file_list.npy"


class CryoLikeFolderError(CryoLikeDaskError):
    """A CryoLike input folder is missing files or holds inconsistent ones."""


# ------------------------------------------------------------------------------ templates
def read_template_list(folder: str | os.PathLike) -> list[Path]:
    """The template files listed in ``folder/template_file_list.npy``, as existing paths.

    CryoLike stores the paths as written when the templates were made, often relative to the
    working directory of that run. Each entry is resolved, in order, as given (absolute or
    relative to the current directory), relative to the folder's parent, then as a file name
    inside ``folder``.
    """
    folder = Path(folder)
    listing = folder / TEMPLATE_LIST
    if not listing.is_file():
        raise CryoLikeFolderError(f"{listing}: file not found (the list of template files)")
    try:
        entries = np.load(listing, allow_pickle=False)
    except ValueError:
        raise CryoLikeFolderError(
            f"{listing}: expected a NumPy array of path strings (not pickled objects)"
        ) from None
    except (OSError, EOFError) as exc:
        raise CryoLikeFolderError(f"{listing}: not a readable .npy file ({exc})") from exc
    entries = np.atleast_1d(entries)
    if entries.dtype.kind not in "US" or entries.size == 0:
        raise CryoLikeFolderError(f"{listing}: expected a non-empty array of path strings")
    paths = []
    for entry in entries.tolist():
        raw = Path(entry.decode() if isinstance(entry, bytes) else entry)
        candidates = [raw] if raw.is_absolute() else [raw, folder.parent / raw, folder / raw.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            tried = ", ".join(str(c) for c in candidates)
            raise CryoLikeFolderError(
                f"{listing}: template file {entry!r} not found (tried {tried})"
            )
        paths.append(found.resolve())
    return paths


def template_name(path: Path) -> str:
    """``templates_fourier_NAME.pt`` → ``NAME``."""
    stem = path.stem
    return stem[len("templates_fourier_") :] if stem.startswith("templates_fourier_") else stem


def load_templates(path: str | os.PathLike, params: ImageParameters) -> np.ndarray:
    """Load one template file and check it against the image parameters.

    Returns complex ``[S, N, W]``; raises :class:`CryoLikeFolderError` if the shape does not
    match the polar grid or the template count differs from the number of viewing directions.
    """
    t = load_tensor(path, "template stack [S, N, W]")
    grid = params.polar_grid
    if t.ndim != 3 or t.shape[1:] != grid.shape or not np.iscomplexobj(t):
        raise CryoLikeFolderError(
            f"{path}: template stack has shape {t.shape} and dtype {t.dtype}; expected complex "
            f"[S, {grid.n_shells}, {grid.n_inplanes}] for the polar grid of the parameters"
        )
    n_angles = params.viewing_angles.n_angles
    if t.shape[0] != n_angles:
        raise CryoLikeFolderError(
            f"{path}: {t.shape[0]} templates but the parameters' viewing distance "
            f"{params.viewing_distance:.6g} gives {n_angles} viewing directions"
        )
    return t


# ------------------------------------------------------------------------------ particles
def stack_paths(particles: str | os.PathLike, i_stack: int) -> tuple[Path, Path]:
    """``(…/fft/particles_fourier_stack_NNNNNN.pt, ….npz)`` of stack ``i_stack``."""
    fft = Path(particles) / "fft"
    base = f"particles_fourier_stack_{i_stack:06d}"
    return fft / f"{base}.pt", fft / f"{base}.npz"


def count_stacks(particles: str | os.PathLike) -> int:
    """Number of consecutive stacks 0, 1, … present (both ``.pt`` and ``.npz``)."""
    n = 0
    while all(p.is_file() for p in stack_paths(particles, n)):
        n += 1
    return n


def check_stacks_exist(particles: str | os.PathLike, n_stacks: int) -> None:
    """Raise :class:`CryoLikeFolderError` listing every missing stack file of ``0..n_stacks-1``."""
    if n_stacks < 1:
        raise CryoLikeFolderError(f"n_stacks must be at least 1, not {n_stacks}")
    missing = [
        str(p) for i in range(n_stacks) for p in stack_paths(particles, i) if not p.is_file()
    ]
    if missing:
        have = count_stacks(particles)
        raise CryoLikeFolderError(
            f"{n_stacks} particle stacks requested but {len(missing)} files are missing "
            f"({have} complete stacks found):\n  " + "\n  ".join(missing[:10])
        )


@dataclass(frozen=True)
class ParticleStack:
    """One CryoLike particle stack: Fourier images and their parameters."""

    images: np.ndarray  # complex [n, N, W]
    lens: LensParameters
    parameters: ImageParameters


def load_stack(
    particles: str | os.PathLike,
    i_stack: int,
    params: ImageParameters | None = None,
    astigmatism_convention: str | None = None,
) -> ParticleStack:
    """Load stack ``i_stack`` and check it against ``params`` (if given).

    Raises :class:`CryoLikeFolderError` naming the file and field on any mismatch.
    """
    pt, npz = stack_paths(particles, i_stack)
    fields = read_npz(npz)
    stack_params = ImageParameters.from_dict(fields, source=str(npz))
    lens = LensParameters.from_dict(fields, str(npz), astigmatism_convention)
    images = load_tensor(pt, "particle stack [n, N, W]")
    grid = stack_params.polar_grid
    if images.ndim != 3 or images.shape[1:] != grid.shape or not np.iscomplexobj(images):
        raise CryoLikeFolderError(
            f"{pt}: images have shape {images.shape} and dtype {images.dtype}; expected complex "
            f"[n, {grid.n_shells}, {grid.n_inplanes}] for the polar grid of {npz.name}"
        )
    if lens.n_images != images.shape[0]:
        raise CryoLikeFolderError(
            f"{npz}: lens parameters for {lens.n_images} images but {pt.name} holds "
            f"{images.shape[0]}"
        )
    if params is not None:
        diffs = params.incompatibilities(stack_params)
        if diffs:
            raise CryoLikeFolderError(
                f"{npz}: image parameters differ from the run's parameters: " + "; ".join(diffs)
            )
    return ParticleStack(images, lens, stack_params)


def stack_size(particles: str | os.PathLike, i_stack: int) -> int:
    """Number of images of a stack, from its ``.npz`` (``n_images``, else ``defocusU``)."""
    _, npz = stack_paths(particles, i_stack)
    fields = read_npz(npz)
    if fields.get("n_images") is not None:
        return int(fields["n_images"])
    if fields.get("defocusU") is None:
        raise ParameterFileError(f"{npz}: missing field 'defocusU' (defocus U per image, Å)")
    return int(np.atleast_1d(fields["defocusU"]).size)


def write_stack_npz(
    path: str | os.PathLike, params: ImageParameters, lens: LensParameters, extra: dict
) -> Path:
    """A particle stack's ``.npz``: image parameters, lens parameters (radians) and ``extra``.

    The keys are CryoLike's (``save_combined_params``) plus ``astigmatism_convention`` and the
    provenance fields in ``extra`` (``source_rows``, ``files``, ``idxs``, ...). Written
    atomically; an existing file is replaced.
    """
    from cryolike_dask.params.npz import write_npz

    fields = params.to_dict()
    fields.update(lens.to_dict())
    fields.update(extra)
    return write_npz(path, fields, overwrite=True)


# ------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class OutputLayout:
    """Paths of CryoLike's likelihood outputs under ``root``."""

    root: Path

    @property
    def displacements(self) -> Path:
        """``OUT/displacements_set.pt``."""
        return self.root / "displacements_set.pt"

    def template_dir(self, i_template: int) -> Path:
        """``OUT/templateN`` (``N`` not padded)."""
        return self.root / f"template{i_template}"

    def file(self, i_template: int, folder: str, name: str, i_stack: int) -> Path:
        """``OUT/templateN/FOLDER/NAME_stack_SSSSSS.pt``."""
        return self.template_dir(i_template) / folder / f"{name}_stack_{i_stack:06d}.pt"

    def stack_files(
        self, i_template: int, i_stack: int, quantities: Iterable[Quantity]
    ) -> dict[str, Path]:
        """Every output file of one stack for ``quantities``, keyed by quantity name."""
        return {q.name: self.file(i_template, q.folder, q.stem, i_stack) for q in quantities}

    def run_outputs(self) -> list[Path]:
        """What a likelihood run writes here (existing paths): results, exports, records,
        matrices and plots."""
        names = ["results.zarr", "displacements_set.pt", ".cryolike_dask", "likelihood_matrix"]
        names.append("plots")
        found = [self.root / n for n in names if (self.root / n).exists()]
        found += sorted(
            p for p in self.root.glob("template*") if p.is_dir() and p.name[8:].isdigit()
        )
        return found

    def make_tree(self, i_template: int) -> None:
        """Create ``templateN/{log_likelihood,cross_correlation,optimal_pose}`` (as CryoLike)."""
        for sub in ("log_likelihood", "cross_correlation", "optimal_pose"):
            (self.template_dir(i_template) / sub).mkdir(parents=True, exist_ok=True)
