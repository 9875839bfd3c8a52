"""`flexmol explain`: which atoms, bonds and functional groups drive a model's view of a molecule.

Two kinds of atom and bond importance, each normalised per molecule to [-1, 1]:

- ``attention`` (any checkpoint of either recipe; M2UMol's functional-group analysis): the 2D
  encoder's attention probabilities averaged over heads and layers, restricted to bonded pairs;
  an atom's weight is the sum of its row (the attention it pays its bonded neighbours), a bond's
  the mean of its pair's two entries. Weights are min-max scaled to [-1, 1] per molecule: -1 the
  least, +1 the most attended.
- ``gradient`` (a fine-tuned task model, whose prediction of one task is explained): integrated
  gradients of the task's output (the logit for classification) with respect to the atoms' 2D
  input embeddings (an atom's importance is the sum over channels) and the bonded pairs' 2D pair
  inputs (a bond's importance sums both directions and the heads), from the masked molecule
  (every atom's input the mask token, every pair input zero; see :func:`gradient_importance`).
  Signed: positive pushes the prediction up (towards the positive class); divided by the
  molecule's largest absolute value. The attributions of all atoms and pairs add up to the output
  minus the masked molecule's output (completeness, reported in the JSON).

Functional groups are RDKit's fragment patterns (``FragmentDescriptors.csv`` of RDKit's data
directory, the ``fr_*`` descriptors), named as RDKit describes them. Each atom is counted in one
group at most, the largest pattern that matches it (ties: the file's order), so the groups' shares
of the molecule's total absolute atom importance sum to at most 1 (the rest: atoms in no group).
"""
from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from flexmol.config import ConfigError

METHODS = ("attention", "gradient")
# Points on the integrated-gradients path: enough that the attributions add up to the output's
# change within a few percent (see :func:`gradient_importance`).
STEPS = 32
# RDKit's fr_* descriptors that count sites or generic atom classes rather than functional groups
# (metabolic sites, amine classes that match any nitrogen, ring-system topology), or narrower
# variants of another pattern's atoms: not named as groups.
NOT_GROUPS = ("fr_NH0", "fr_NH1", "fr_NH2", "fr_bicyclic", "fr_unbrch_alkane", "fr_para_hydroxylation",
              "fr_allylic_oxid", "fr_aryl_methyl", "fr_Ndealkylation1", "fr_Ndealkylation2", "fr_HOCCN",
              "fr_C=O_noCOO", "fr_Al_OH_noTert", "fr_phenol_noOrthoHbond", "fr_ketone_Topliss",
              "fr_nitro_arom_nonortho")


class ExplainError(ConfigError):
    """Arguments, a checkpoint or a task model that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------- molecules

@dataclass
class Parsed:
    """One input made into a 2D record and the RDKit molecule whose atoms are its nodes, in order."""

    index: int
    id: str
    input: str
    record: dict
    mol: object  # rdkit.Chem.Mol


def parse(smiles: Sequence[str], featurizer=None) -> tuple[list[Parsed], list[dict]]:
    """The inputs as 2D records with their molecules, and the rejects ``{index, id, input, code,
    reason}``, each in input order. ``featurizer``: a :class:`FeaturizerConfig` (the defaults)."""
    from flexmol.chem.errors import Rejected
    from flexmol.chem.featurizer import Featurizer, RawInput
    from flexmol.config import FeaturizerConfig

    feat = Featurizer(featurizer or FeaturizerConfig(num_conformers=1), "2d")
    parsed, rejects = [], []
    for i, text in enumerate(smiles):
        try:
            record, mol = feat.with_molecule(RawInput(i, str(i), "smiles", text))
        except Rejected as exc:
            rejects.append({"index": i, "id": str(i), "input": text, "code": exc.code, "reason": exc.reason})
            continue
        except Exception as exc:  # noqa: BLE001 -- RDKit raising on a pathological molecule
            rejects.append({"index": i, "id": str(i), "input": text, "code": "error",
                            "reason": f"{type(exc).__name__}: {exc}"})
            continue
        parsed.append(Parsed(i, str(i), text, record, mol))
    return parsed, rejects


def bonds_of(mol) -> np.ndarray:
    """[num_bonds, 2] atom indices of every bond, in RDKit's bond order."""
    return np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------------- models

def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone network of a task model (inside peft's wrapper when it has adapters), or the
    model itself when it is a backbone."""
    body = getattr(model, "backbone", model)
    return body.get_base_model() if hasattr(body, "get_base_model") else body


def _part(backbone: torch.nn.Module, name: str, what: str):
    part = getattr(backbone, name, None)
    if part is None:
        raise ExplainError(f"the {type(backbone).__name__} network has no {name} ({what}); "
                           "this explanation needs this project's 2D encoder")
    return part


def _batch(parsed: Sequence[Parsed], backbone, device) -> dict:
    from flexmol.data.collate import collate, move

    return move(collate([p.record for p in parsed], backbone.cfg.max_spd, backbone.cfg.max_path), device)


def minmax(values: np.ndarray) -> np.ndarray:
    """``values`` scaled linearly onto [-1, 1] (all equal: zeros)."""
    if values.size == 0:
        return values.astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    return (np.zeros_like(values) if hi - lo <= 0 else 2 * (values - lo) / (hi - lo) - 1).astype(np.float32)


def maxabs(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their largest absolute value (all zero: zeros), so in [-1, 1] with signs kept."""
    if values.size == 0:
        return values.astype(np.float32)
    top = float(np.abs(values).max())
    return (values / top if top > 0 else np.zeros_like(values)).astype(np.float32)


@torch.no_grad()
def attention_importance(model: torch.nn.Module, parsed: Sequence[Parsed], device="cpu") -> list[dict]:
    """Per molecule ``{"atoms": [n], "bonds": [num_bonds], "raw_atoms", "raw_bonds"}`` of the attention
    method (see the module's note): ``atoms``/``bonds`` in [-1, 1], ``raw_*`` the unscaled weights.
    ``model``: a backbone or a task model (its backbone's 2D encoder, adapters included, is read)."""
    from flexmol.model.layers import capture_attention

    backbone = backbone_of(model)
    encoder = _part(backbone, "encoder_2d", "the 2D encoder")
    if not hasattr(encoder, "layers"):
        raise ExplainError(f"the 2D encoder of the {type(backbone).__name__} network ({type(encoder).__name__}) "
                           "records no attention; attention importance needs this project's 2D encoder")
    batch = _batch(parsed, backbone, device)
    with capture_attention(encoder) as records:
        body = getattr(model, "backbone", model)
        body(batch, decode=False)
    if len(records) != len(encoder.layers):
        raise ExplainError(f"recorded {len(records)} attention layers of the 2D encoder's {len(encoder.layers)}")
    attn = torch.stack(records).mean(0).cpu().numpy()  # [B, N, N], layers and heads averaged
    out = []
    for b, p in enumerate(parsed):
        n = p.mol.GetNumAtoms()
        pairs = bonds_of(p.mol)
        adj = np.zeros((n, n), dtype=bool)
        adj[pairs[:, 0], pairs[:, 1]] = adj[pairs[:, 1], pairs[:, 0]] = True
        a = attn[b, :n, :n]
        atoms = (a * adj).sum(1)
        bonds = (a[pairs[:, 0], pairs[:, 1]] + a[pairs[:, 1], pairs[:, 0]]) / 2
        out.append({"atoms": minmax(atoms), "bonds": minmax(bonds), "raw_atoms": atoms.astype(np.float32),
                    "raw_bonds": bonds.astype(np.float32)})
    return out


def gradient_importance(task_model: torch.nn.Module, parsed: Sequence[Parsed], task: int = 0, device="cpu",
                        steps: int = STEPS) -> tuple[list[dict], np.ndarray]:
    """Per molecule ``{"atoms", "bonds", "raw_atoms", "raw_bonds", "completeness"}`` of the gradient
    method for output ``task`` of ``task_model`` (a logit for classification), and that output [B].

    Integrated gradients (Sundararajan et al., 2017) from the masked molecule: the baseline has
    every atom's 2D input embedding replaced by the encoder's mask token (what pre-training's
    ``atom_masked`` gives: an atom whose every feature is hidden) and every 2D pair input at zero
    (no distance, no bond). The atom inputs x [B, N, d] and the pair inputs P [B, N, N, H] move
    together on the straight path from the baseline to their values; the gradients of the output
    at ``steps`` points of that path (midpoints) are averaged and multiplied by the path's direction
    (input minus baseline). An atom's importance sums its channels; a bond's sums its pair's two
    directions and the heads. Completeness holds: the attributions of every atom and every pair
    add up to the output minus the output at the baseline, up to the path's discretisation;
    ``completeness`` = ``{"output", "baseline_output", "attribution_sum"}`` says how well. (A zero
    atom baseline is not used: the encoder's pre-layer norms make the output jump within the first
    percent of a path from zero, between any affordable points, so completeness fails there. Plain
    gradient x input is not used either: the pre-layer norms make the output nearly invariant to an
    atom input's scale, so it measures little.) ``atoms``/``bonds`` are divided by the molecule's
    largest absolute value (signs kept); ``raw_*`` are the attributions themselves.
    """
    backbone = backbone_of(task_model)
    batch = _batch(parsed, backbone, device)
    mask = batch["mask"]
    atom_input = _part(backbone, "atom_2d", "the 2D atom input")
    mask_token = getattr(atom_input, "mask_token", None)
    if mask_token is None:
        raise ExplainError(f"the 2D atom input of the {type(backbone).__name__} network has no mask token; "
                           "the gradient method's baseline is the masked molecule")
    deltas: dict[str, torch.Tensor] = {}  # input minus baseline
    points: dict[str, torch.Tensor] = {}  # the current point of the path
    alpha = {"value": 1.0}

    def on_path(name, baseline):
        def hook(module, args, output):
            base = baseline(output.detach())
            deltas[name] = output.detach() - base
            points[name] = (base + alpha["value"] * deltas[name]).requires_grad_(True)
            return points[name]
        return hook

    # padding atoms and pairs keep their values: their differences, and attributions, are zero
    atom_base = lambda x: torch.where(mask.unsqueeze(-1), mask_token.detach().to(x.dtype), x)  # noqa: E731
    pair_mask = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(-1)
    pair_base = lambda p: torch.where(pair_mask, torch.zeros_like(p), p)  # noqa: E731
    handles = [atom_input.register_forward_hook(on_path("x", atom_base)),
               _part(backbone, "pair_2d", "the 2D pair input").register_forward_hook(on_path("P", pair_base))]
    grad_x = grad_p = None
    try:
        with torch.no_grad():
            output = task_model(batch)[:, task].float()
            alpha["value"] = 0.0
            baseline_output = task_model(batch)[:, task].float()
        with torch.enable_grad():
            for k in range(steps):
                alpha["value"] = (k + 0.5) / steps
                y = task_model(batch)[:, task].float()
                gx, gp = torch.autograd.grad(y.sum(), [points["x"], points["P"]])
                grad_x = gx if grad_x is None else grad_x + gx
                grad_p = gp if grad_p is None else grad_p + gp
    finally:
        for handle in handles:
            handle.remove()
    # the mean gradient along the path, times the path's direction
    atom_attr = (grad_x / steps * deltas["x"]).sum(-1).float().cpu().numpy()  # [B, N]
    pair_attr = (grad_p / steps * deltas["P"]).sum(-1).float().cpu().numpy()  # [B, N, N]
    output, baseline_output = output.cpu().numpy(), baseline_output.cpu().numpy()
    out = []
    for b, p in enumerate(parsed):
        n = p.mol.GetNumAtoms()
        pairs = bonds_of(p.mol)
        atoms = atom_attr[b, :n]
        bonds = pair_attr[b, pairs[:, 0], pairs[:, 1]] + pair_attr[b, pairs[:, 1], pairs[:, 0]]
        total = float(atoms.sum(dtype=np.float64) + pair_attr[b, :n, :n].sum(dtype=np.float64))
        out.append({"atoms": maxabs(atoms), "bonds": maxabs(bonds), "raw_atoms": atoms.astype(np.float32),
                    "raw_bonds": bonds.astype(np.float32),
                    "completeness": {"output": float(output[b]), "baseline_output": float(baseline_output[b]),
                                     "attribution_sum": total}})
    return out, output


# ------------------------------------------------------------------------------ functional groups

@dataclass(frozen=True)
class Pattern:
    code: str  # RDKit's descriptor name, fr_*
    name: str  # RDKit's description, "Number of " dropped
    smarts: str
    query: object  # rdkit.Chem.Mol
    size: int  # atoms in the pattern


@lru_cache(maxsize=1)
def functional_groups() -> tuple[Pattern, ...]:
    """RDKit's fragment patterns (``FragmentDescriptors.csv``) except :data:`NOT_GROUPS`, largest
    first (ties in the file's order): the order atoms are assigned to groups in."""
    from rdkit import Chem, RDConfig

    patterns = []
    for line in (Path(RDConfig.RDDataDir) / "FragmentDescriptors.csv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        code, description, smarts = line.split("\t")[:3]
        query = Chem.MolFromSmarts(smarts)
        if code in NOT_GROUPS or query is None:
            continue
        name = description.strip('"').removeprefix("Number of ").strip()
        patterns.append(Pattern(code, name[:1].lower() + name[1:] if not name[:2].isupper() else name,
                                smarts, query, query.GetNumAtoms()))
    order = sorted(range(len(patterns)), key=lambda i: (-patterns[i].size, i))
    return tuple(patterns[i] for i in order)


def group_shares(mol, importance: np.ndarray) -> list[dict]:
    """The functional groups of ``mol`` with their share of the total absolute atom ``importance``:
    ``{"name", "codes", "atoms", "matches", "share"}`` per group name, largest share first; each atom
    counted in one group at most (see the module's note), so the shares sum to at most 1."""
    total = float(np.abs(importance).sum())
    taken: set[int] = set()
    groups: dict[str, dict] = {}
    for pat in functional_groups():
        matches = mol.GetSubstructMatches(pat.query)
        atoms = sorted({a for m in matches for a in m} - taken)
        if not atoms:
            continue
        taken.update(atoms)
        g = groups.setdefault(pat.name, {"name": pat.name, "codes": [], "atoms": [], "matches": 0})
        g["codes"].append(pat.code)
        g["atoms"] = sorted(set(g["atoms"]) | set(atoms))
        g["matches"] += len(matches)
    for g in groups.values():
        g["share"] = float(np.abs(importance[g["atoms"]]).sum() / total) if total > 0 else 0.0
    return sorted(groups.values(), key=lambda g: (-g["share"], g["name"]))


# ---------------------------------------------------------------------------------- explaining

@dataclass
class Explanation:
    index: int
    id: str
    input: str
    smiles: str  # canonical
    mol: object
    # method -> {"atoms", "bonds", "raw_atoms", "raw_bonds", "groups"} (+ "completeness" for the gradient)
    methods: dict = field(default_factory=dict)
    prediction: Optional[dict] = None  # {"task", "kind", "value"}

    def to_json(self) -> dict:
        bonds = bonds_of(self.mol).tolist()
        return {
            "index": self.index, "id": self.id, "input": self.input, "smiles": self.smiles,
            "atoms": [a.GetSymbol() for a in self.mol.GetAtoms()], "bonds": bonds, "prediction": self.prediction,
            "methods": {m: {"atom_importance": r["atoms"].tolist(), "bond_importance": r["bonds"].tolist(),
                            "atom_raw": r["raw_atoms"].tolist(), "bond_raw": r["raw_bonds"].tolist(),
                            "groups": r["groups"],
                            **({"completeness": r["completeness"]} if "completeness" in r else {})}
                        for m, r in self.methods.items()},
        }


def explain(parsed: Sequence[Parsed], *, backbone=None, task_model=None, task_meta: Optional[dict] = None,
            task: Optional[str] = None, methods: Sequence[str] = ("attention",), device="cpu",
            batch_size: int = 32, steps: int = STEPS) -> list[Explanation]:
    """Explanations of ``parsed`` molecules by ``methods``. The attention method reads
    ``task_model``'s backbone when given, else ``backbone``; the gradient method needs
    ``task_model`` (with its ``task.json`` as ``task_meta``) and explains target ``task`` (by name;
    default: the only one) with integrated gradients over ``steps`` points."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExplainError(f"method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if "gradient" in methods and task_model is None:
        raise ExplainError("the gradient method explains a task model's prediction: give --task-model")
    if task_model is None and backbone is None:
        raise ExplainError("nothing to explain with: give a checkpoint or a task model")
    t = task_index(task_meta, task) if task_model is not None else None
    out = [Explanation(p.index, p.id, p.input, p.record["smiles"], p.mol) for p in parsed]
    model = task_model if task_model is not None else backbone
    for s in range(0, len(parsed), batch_size):
        chunk, ex = parsed[s:s + batch_size], out[s:s + batch_size]
        results: dict[str, list[dict]] = {}
        if "attention" in methods:
            results["attention"] = attention_importance(model, chunk, device)
        if "gradient" in methods:
            results["gradient"], outputs = gradient_importance(task_model, chunk, t, device, steps)
        elif task_model is not None:
            outputs = predict(task_model, chunk, t, device)
        if task_model is not None:
            for e, value in zip(ex, outputs):
                e.prediction = prediction(task_meta, t, float(value))
        for method, per in results.items():
            for e, r in zip(ex, per):
                e.methods[method] = {**r, "groups": group_shares(e.mol, r["atoms"])}
    return out


@torch.no_grad()
def predict(task_model: torch.nn.Module, parsed: Sequence[Parsed], task: int = 0, device="cpu") -> np.ndarray:
    """Output ``task`` of ``task_model`` for ``parsed`` [B] (a logit for classification)."""
    batch = _batch(parsed, backbone_of(task_model), device)
    return task_model(batch)[:, task].float().cpu().numpy()


def task_index(meta: dict, task: Optional[str]) -> int:
    targets = list(meta["targets"])
    if task is None:
        if len(targets) > 1:
            raise ExplainError(f"the task model predicts {len(targets)} targets ({', '.join(targets)}): name one "
                               "with --task")
        return 0
    if task not in targets:
        raise ExplainError(f"--task {task!r}: the task model's targets are {', '.join(targets)}")
    return targets.index(task)


def prediction(meta: dict, t: int, output: float) -> dict:
    """The task model's output as a user reads it: a probability for classification; for
    regression the model's standardised output (the training part's mean and std are not saved
    with the model)."""
    if meta["task"] == "classification":
        return {"task": meta["targets"][t], "kind": "probability", "value": float(1 / (1 + np.exp(-output)))}
    return {"task": meta["targets"][t], "kind": "standardised value", "value": output}


# ------------------------------------------------------------------------------------ the report

METHOD_TEXT = {
    "attention": ("attention", "least attended", "most attended",
                  "2D encoder attention averaged over heads and layers, restricted to bonded pairs; atom = row "
                  "sum, bond = its pair's mean; min-max scaled to [-1, 1] per molecule"),
    "gradient": ("integrated gradients", "lowers the prediction", "raises the prediction",
                 "integrated gradients of the task's output (the logit for classification) from the masked "
                 "molecule (every atom the mask token, every pair input zero), "
                 "on the atoms' 2D input embeddings (bonds: on their 2D pair inputs); divided by the largest "
                 "absolute value per molecule"),
}


def picture_name(e: Explanation, method: str) -> str:
    return f"mol{e.index}_{method}"


def write_pictures(explanations: Sequence[Explanation], directory: Path) -> dict:
    """SVG and PNG pictures of every explanation and method in ``directory``; returns
    ``{(index, method): svg text}`` for inlining."""
    from flexmol.tools.draw import molecule_png, molecule_svg

    directory.mkdir(parents=True, exist_ok=True)
    svgs = {}
    for e in explanations:
        for method, r in e.methods.items():
            legend = f"{e.id}: {METHOD_TEXT[method][0]}"
            svg = molecule_svg(e.mol, r["atoms"], r["bonds"], legend=legend)
            (directory / f"{picture_name(e, method)}.svg").write_text(svg)
            (directory / f"{picture_name(e, method)}.png").write_bytes(
                molecule_png(e.mol, r["atoms"], r["bonds"], legend=legend))
            svgs[(e.index, method)] = svg
    return svgs


def render_html(explanations: Sequence[Explanation], rejects: Sequence[dict], svgs: dict, *, checkpoint: str,
                task_model: Optional[str], files_dir: str) -> str:
    """The report: one section per molecule (prediction, a picture per method, the functional-group
    table), the rejected inputs with their reasons, colour bars; self-contained (no URL)."""
    from flexmol.tools.draw import colour_bar_svg, hex_colour, inline_svg

    esc = html.escape
    methods = [m for m in METHODS if any(m in e.methods for e in explanations)]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>flexmol explain</title><style>',
             "body{font-family:sans-serif;margin:1.5em;max-width:1100px}"
             "table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:left}.mol{border-top:1px solid #888;margin-top:1.2em}.pics{display:flex;flex-wrap:wrap;"
             "gap:1em}.pic{flex:0 0 auto}.swatch{display:inline-block;width:1em;height:1em;border:1px solid #999;"
             "vertical-align:middle}code{font-size:90%}.reject{color:#a00}",
             "</style></head><body>", "<h1>Atom and functional-group importance</h1>",
             f"<p>checkpoint <code>{esc(checkpoint)}</code>"
             + (f"; task model <code>{esc(task_model)}</code>" if task_model else "")
             + f"; {len(explanations)} molecule(s) explained, {len(rejects)} rejected. Pictures (SVG, PNG) in "
               f"<code>{esc(files_dir)}/</code>.</p>"]
    for m in methods:
        title, low, high, how = METHOD_TEXT[m]
        bar = colour_bar_svg(esc(low), esc(high), ident=f"bar-{m}")
        parts.append(f"<div><b>{esc(title)}</b>: {esc(how)}.<br>{bar}</div>")
    if rejects:
        parts.append("<h2>Rejected inputs</h2><table><tr><th>#</th><th>input</th><th>reason</th></tr>")
        parts += [f'<tr class="reject"><td>{r["index"]}</td><td><code>{esc(r["input"])}</code></td>'
                  f'<td>{esc(r["reason"])}</td></tr>' for r in rejects]
        parts.append("</table>")
    for e in explanations:
        parts.append(f'<div class="mol"><h2>{esc(e.id)}: <code>{esc(e.smiles)}</code></h2>')
        if e.input != e.smiles:
            parts.append(f"<p>input <code>{esc(e.input)}</code></p>")
        if e.prediction:
            p = e.prediction
            parts.append(f"<p>prediction of <b>{esc(p['task'])}</b>: {p['kind']} {p['value']:.3f}</p>")
        parts.append('<div class="pics">')
        for m in methods:
            if m not in e.methods:
                continue
            r = e.methods[m]
            rows = "".join(f'<tr><td>{esc(g["name"])}</td><td>{", ".join(esc(c) for c in g["codes"])}</td>'
                           f'<td>{len(g["atoms"])}</td><td>{g["share"]:.1%}</td>'
                           f'<td><span class="swatch" style="background:'
                           f'{hex_colour(float(np.mean(r["atoms"][g["atoms"]])))}"></span></td></tr>'
                           for g in r["groups"])
            covered = sum(g["share"] for g in r["groups"])
            rows += f"<tr><td><i>atoms in no group</i></td><td></td><td></td><td>{1 - covered:.1%}</td><td></td></tr>" \
                if r["groups"] else ""
            c = r.get("completeness")
            check = (f"<p>output {c['output']:.3f}, masked molecule {c['baseline_output']:.3f}: attributions sum to "
                     f"{c['attribution_sum']:.3f} (should be {c['output'] - c['baseline_output']:.3f})</p>"
                     ) if c else ""
            parts.append(f'<div class="pic"><h3>{esc(METHOD_TEXT[m][0])}</h3>{inline_svg(svgs[(e.index, m)])}{check}'
                         "<table><tr><th>functional group</th><th>RDKit</th><th>atoms</th><th>share of |importance|"
                         f"</th><th>mean</th></tr>{rows or '<tr><td colspan=5>none found</td></tr>'}</table></div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def files_dir_of(out: Path) -> Path:
    """Where the pictures go: ``report_files/`` beside ``report.html``."""
    return out.with_name(out.stem + "_files")


# ------------------------------------------------------------------------------------------- CLI

def add_parser(sub, _sub) -> None:
    """Adds `flexmol explain` to the CLI's subparsers (`_sub` makes a subparser with the CLI's help style)."""
    p = _sub(sub, "explain", "atom, bond and functional-group importance of molecules, as an offline HTML report",
             "Explain SMILES with a checkpoint (attention importance, as M2UMol's functional-group analysis) "
             "and, with --task-model, a fine-tuned model's prediction (integrated gradients). Writes an HTML report "
             "that works offline (molecules drawn inline with atoms and bonds coloured by importance, a colour "
             "bar, each functional group's share of the importance), SVG and PNG pictures beside it (report.html: "
             "report_files/), "
             "and with --json the numbers. An input that cannot be read is reported with its reason and the "
             "others explained. Exit 0 when molecules were explained, 1 when none could be, 2 with one line for "
             "a checkpoint, task model or option that cannot be used.")
    p.add_argument("smiles", nargs="+", metavar="SMILES", help="molecules to explain")
    p.add_argument("--checkpoint", required=True,
                   help="pre-trained export (or a pre-training output_dir holding export/) of either recipe")
    p.add_argument("--task-model", help="a fine-tuned task model: flexmol finetune's OUT/runs/MODEL/seedN/model "
                                        "(adapter/ + head.safetensors, or model.safetensors; with task.json), "
                                        "fine-tuned from --checkpoint")
    p.add_argument("--task", help="the target whose prediction is explained (required when the task model has "
                                  "several)")
    p.add_argument("--method", choices=("attention", "gradient", "both"),
                   help="importance method (default: both with --task-model, attention without; gradient needs "
                        "--task-model)")
    p.add_argument("--out", required=True, help="the HTML report to write (pictures in its stem + _files/)")
    p.add_argument("--json", help="also write the numbers (importance per atom and bond, groups, prediction) "
                                  "to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="molecules per forward pass (default: 32)")
    p.add_argument("--steps", type=int, default=STEPS,
                   help="points on the integrated-gradients path of the gradient method, from the masked molecule "
                        f"(every atom the mask token, every pair input zero) to the input (default: {STEPS})")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    try:
        return run(args)
    except ConfigError as exc:
        print(f"flexmol explain: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ExplainError(f"--device {name!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExplainError(f"--device {name}: no CUDA device here")
    return device


def run(args) -> int:
    methods = {"both": ("attention", "gradient"), None: ("attention", "gradient") if args.task_model else
               ("attention",)}.get(args.method, (args.method,))
    if "gradient" in methods and not args.task_model:
        raise ExplainError("--method gradient explains a task model's prediction: give --task-model DIR")
    if args.task and not args.task_model:
        raise ExplainError("--task names a target of a task model: give --task-model DIR")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ExplainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = Path(args.out)
    if out.is_dir():
        raise ExplainError(f"--out {out}: a directory; give the report's file name (e.g. report.html)")
    device = _device(args.device)
    from flexmol.finetune.config import export_dir

    try:
        export = export_dir(args.checkpoint)
    except ConfigError as exc:
        raise ExplainError(str(exc).replace("config key 'checkpoint'", "--checkpoint")) from None
    backbone = task_model = meta = None
    if args.task_model:
        from flexmol.finetune.model import load_task_model

        task_model, meta = load_task_model(args.task_model, export)
        task_model.to(device)
        if meta.get("mode", "2d") != "2d":
            raise ExplainError(f"{args.task_model}: fine-tuned with mode {meta['mode']}; explanations read the 2D "
                               "input (a task model fine-tuned with mode 2d)")
        task_index(meta, args.task)
        origin = meta.get("checkpoint")
        if origin and Path(origin).is_dir() and Path(origin).resolve() not in (export.resolve(),
                                                                                export.parent.resolve()):
            print(f"flexmol explain: note: {args.task_model}'s task.json says it was fine-tuned from {origin}, "
                  f"not --checkpoint {args.checkpoint}", file=sys.stderr)
    else:
        from flexmol import load_pretrained

        backbone = load_pretrained(export).to(device)
    parsed, rejects = parse(args.smiles)
    for r in rejects:
        print(f"flexmol explain: input {r['index']} {r['input']!r}: {r['reason']}", file=sys.stderr)
    explanations = explain(parsed, backbone=backbone, task_model=task_model, task_meta=meta, task=args.task,
                           methods=methods, device=device, batch_size=args.batch_size, steps=args.steps)
    files = files_dir_of(out)
    svgs = write_pictures(explanations, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(explanations, rejects, svgs, checkpoint=str(args.checkpoint),
                               task_model=args.task_model, files_dir=files.name))
    if args.json:
        payload = {"checkpoint": str(args.checkpoint), "task_model": args.task_model, "methods": list(methods),
                   "molecules": [e.to_json() for e in explanations], "rejects": rejects}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    for e in explanations:
        pred = f"; {e.prediction['task']} {e.prediction['kind']} {e.prediction['value']:.3f}" if e.prediction else ""
        tops = "; ".join(f"{m}: " + (", ".join(f"{g['name']} {g['share']:.0%}" for g in r["groups"][:3]) or "no group")
                         for m, r in e.methods.items())
        print(f"{e.id} {e.smiles}{pred}; {tops}")
    print(f"report: {out} (pictures in {files}/)" + (f"; numbers: {args.json}" if args.json else ""))
    return 0 if explanations else 1
