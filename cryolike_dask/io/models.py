"""Atomic models (PDB, mmCIF) read with gemmi, and the atoms that make a template (spec §5.3).

CryoLike's residue model (the default) keeps the CA atom of every amino-acid residue with a
per-residue radius; otherwise every atom matching the selection gets ``atom_radii``.
Coordinates are in Å, centred on the mean of the selected atoms, as float32 (CryoLike).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryolike_dask.errors import CryoLikeDaskError
from cryolike_dask.params.image import ImageParameters

#: CryoLike's residue radii in Å (3.0 for residue names not listed).
RESIDUE_RADII = {
    "CYS": 2.75,
    "PHE": 3.20,
    "LEU": 3.10,
    "TRP": 3.40,
    "VAL": 2.95,
    "ILE": 3.10,
    "MET": 3.10,
    "HIS": 3.05,
    "TYR": 3.25,
    "ALA": 2.50,
    "GLY": 2.25,
    "PRO": 2.80,
    "ASN": 2.85,
    "THR": 2.80,
    "SER": 2.60,
    "ARG": 3.30,
    "GLN": 3.00,
    "ASP": 2.80,
    "LYS": 3.20,
    "GLU": 2.95,
}
DEFAULT_RESIDUE_RADIUS = 3.0
MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")


class ModelFileError(CryoLikeDaskError):
    """An atomic model is unreadable or selects no atoms."""


@dataclass(frozen=True)
class Atoms:
    """Atoms of a model that make a template: float32 ``[A, 3]`` Å (centred), radii ``[A]`` Å."""

    coordinates: np.ndarray
    radii: np.ndarray
    source: str

    @property
    def n_atoms(self) -> int:
        return int(self.radii.size)


def _selection(selection: str | None, source: Path):
    """A predicate on (atom, residue) for the supported forms of CryoLike's selections."""
    text = (selection or "all").strip()
    words = text.split()
    if text in ("all", ""):
        return lambda atom, res: True
    if words[0] == "name" and len(words) > 1:
        names = set(words[1:])
        return lambda atom, res: atom.name in names
    if words[0] == "element" and len(words) > 1:
        elements = {w.capitalize() for w in words[1:]}
        return lambda atom, res: atom.element.name in elements
    if text == "protein":
        return lambda atom, res: res.name in RESIDUE_RADII
    if text == "backbone":
        return lambda atom, res: res.name in RESIDUE_RADII and atom.name in ("N", "CA", "C", "O")
    if text in ("heavy", "not element H"):
        return lambda atom, res: atom.element.name not in ("H", "D")
    raise ModelFileError(
        f"{source}: atom selection {selection!r} is not supported; use 'all', 'protein', "
        "'backbone', 'heavy', 'name A B ...' or 'element X Y ...'"
    )


def read_atoms(path: str | os.PathLike, params: ImageParameters) -> Atoms:
    """The atoms of the first model of a PDB/mmCIF file, selected as ``params`` says."""
    import gemmi

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: file not found")
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelFileError(f"{p}: unknown model extension (expected {', '.join(MODEL_SUFFIXES)})")
    try:
        structure = gemmi.read_structure(str(p))
    except Exception as exc:
        raise ModelFileError(f"{p}: not a readable atomic model ({exc})") from exc
    if len(structure) == 0:
        raise ModelFileError(f"{p}: the file holds no model")
    model = structure[0]  # the first model, as mdtraj frame 0
    coords, radii = [], []
    if params.use_protein_residue_model:
        for chain in model:
            for residue in chain:
                ca = residue.find_atom("CA", "*")
                if (
                    ca is None
                    or not gemmi.find_tabulated_residue(residue.name)
                    or not (gemmi.find_tabulated_residue(residue.name).is_amino_acid())
                ):
                    continue
                coords.append((ca.pos.x, ca.pos.y, ca.pos.z))
                radii.append(RESIDUE_RADII.get(residue.name, DEFAULT_RESIDUE_RADIUS))
    else:
        if params.atom_radii is None:
            raise ModelFileError(
                f"{p}: without the residue model, the parameters need atom_radii (Å)"
            )
        keep = _selection(params.atom_selection, p)
        for chain in model:
            for residue in chain:
                for atom in residue:
                    if keep(atom, residue):
                        coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                        radii.append(params.atom_radii)
    if not coords:
        what = (
            "amino-acid residues with a CA atom"
            if params.use_protein_residue_model
            else (f"atoms matching {params.atom_selection!r}")
        )
        raise ModelFileError(f"{p}: no {what} in the first model")
    x = np.asarray(coords, dtype=np.float32)
    x = x - x.mean(axis=0, dtype=np.float32)
    return Atoms(x, np.asarray(radii, dtype=np.float64), str(p))
