"""Molecule pictures with atoms and bonds coloured by a value in [-1, 1] (RDKit's rdMolDraw2D), and
the colour bar that reads them, as self-contained SVG (no external reference) and PNG.

The colour map is diverging: -1 blue, 0 white, +1 red, linear in between in RGB.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

NEGATIVE = (0.13, 0.40, 0.67)  # -1
NEUTRAL = (1.0, 1.0, 1.0)  # 0
POSITIVE = (0.70, 0.09, 0.17)  # +1


def colour(value: float) -> tuple[float, float, float]:
    """The RGB (0-1 floats) of ``value`` clipped to [-1, 1]."""
    v = float(np.clip(value, -1.0, 1.0))
    end = POSITIVE if v >= 0 else NEGATIVE
    return tuple(n + abs(v) * (e - n) for n, e in zip(NEUTRAL, end))


def hex_colour(value: float) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in colour(value))


def _drawer(mol, atom_values: Sequence[float], bond_values: Optional[Sequence[float]], drawer, legend: str):
    from rdkit.Chem.Draw import rdMolDraw2D

    atoms = list(range(mol.GetNumAtoms()))
    bonds = list(range(mol.GetNumBonds()))
    opts = drawer.drawOptions()
    opts.clearBackground = True
    opts.fillHighlights = True
    opts.continuousHighlight = True
    opts.legendFontSize = 14
    bond_colours = {} if bond_values is None else {b: colour(bond_values[b]) for b in bonds}
    rdMolDraw2D.PrepareAndDrawMolecule(
        drawer, mol, legend=legend, highlightAtoms=atoms,
        highlightAtomColors={a: colour(atom_values[a]) for a in atoms},
        highlightAtomRadii={a: 0.4 for a in atoms}, highlightBonds=bonds if bond_values is not None else [],
        highlightBondColors=bond_colours)
    drawer.FinishDrawing()
    return drawer


def molecule_svg(mol, atom_values: Sequence[float], bond_values: Optional[Sequence[float]] = None, *,
                 size: tuple[int, int] = (420, 320), legend: str = "") -> str:
    """An SVG document of ``mol`` (RDKit atom order) with atom ``i`` shaded by ``atom_values[i]``
    and bond ``k`` (RDKit bond index) by ``bond_values[k]``, values in [-1, 1]."""
    from rdkit.Chem.Draw import rdMolDraw2D

    return _drawer(mol, atom_values, bond_values, rdMolDraw2D.MolDraw2DSVG(*size), legend).GetDrawingText()


def molecule_png(mol, atom_values: Sequence[float], bond_values: Optional[Sequence[float]] = None, *,
                 size: tuple[int, int] = (420, 320), legend: str = "") -> bytes:
    """The PNG bytes of :func:`molecule_svg`'s picture (RDKit's Cairo drawer)."""
    from rdkit.Chem.Draw import rdMolDraw2D

    return _drawer(mol, atom_values, bond_values, rdMolDraw2D.MolDraw2DCairo(*size), legend).GetDrawingText()


_XML_HEADER = re.compile(r"<\?xml[^>]*\?>\s*")
_NAMESPACE = re.compile(r"\s+xmlns(?::\w+)?=(['\"])[^'\"]*\1")


def inline_svg(svg: str) -> str:
    """An SVG document as an element to place inside HTML: no XML declaration and no namespace
    declarations (HTML places ``<svg>`` in its namespace itself), so the page names no URL."""
    return _NAMESPACE.sub("", _XML_HEADER.sub("", svg)).strip()


def colour_bar_svg(low_label: str, high_label: str, *, ident: str = "importance-bar", width: int = 320,
                   height: int = 46) -> str:
    """A horizontal colour bar from -1 to +1 with tick labels and the meaning of either end, as
    an inline SVG element (no namespace, no URL); ``ident``: its gradient's id, unique in a page."""
    stops = "".join(f'<stop offset="{(v + 1) / 2:.2f}" stop-color="{hex_colour(v)}"/>'
                    for v in np.linspace(-1, 1, 9))
    bar_w = width - 20
    ticks = "".join(f'<text x="{10 + bar_w * (v + 1) / 2:.0f}" y="34" font-size="11" text-anchor="middle">{v:+g}'
                    "</text>".replace("+0<", "0<") for v in (-1, -0.5, 0, 0.5, 1))
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="colour bar from -1 to +1">'
            f'<defs><linearGradient id="{ident}">{stops}</linearGradient></defs>'
            f'<rect x="10" y="4" width="{bar_w}" height="16" fill="url(#{ident})" stroke="#888"/>{ticks}'
            f'<text x="10" y="{height - 1}" font-size="11">{low_label}</text>'
            f'<text x="{width - 10}" y="{height - 1}" font-size="11" text-anchor="end">{high_label}</text></svg>')
