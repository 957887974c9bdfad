"""Leave-one-case-out cross-validation of support sets.

A clinic that curates support sets wants to know how well they transfer to a
patient they were not built from. For each labelled case: build support sets
(with the shipped recipes) from all the other cases, segment the case with
them, and measure against its own labels. With a single real case, synthetic
phantoms make up the other cases so the path runs end to end (and show how
far synthetic anatomy is from real).
"""

from __future__ import annotations

from pathlib import Path

from autocontour.catalogue import default_definition
from autocontour.config import Settings
from autocontour.evaluation.evaluate import evaluate_pairs, pair_inputs, write_report
from autocontour.options import SegmentOptions
from autocontour.phantom import save_phantom
from autocontour.pipeline import Segmenter
from autocontour.support.build import build_support_set
from autocontour.support.recipes import load_recipes


def cross_validate(cases: list[tuple[Path, Path]], structures: list[str], out: Path, weights: Path | None = None,
                   phantoms: int = 0, support_set_size: int = 32, support_size: int | None = None,
                   tolerances_mm=(1.0, 2.0, 3.0), device: str | None = None) -> list[dict]:
    out = Path(out)
    named = [(Path(ct), Path(labels), f"case{i}") for i, (ct, labels) in enumerate(cases)]
    for k in range(phantoms):
        ct, labels = save_phantom(out / "phantoms" / f"phantom{k}", seed=5000 + k,
                                  size=(100, 84, 40), spacing=(4.0, 4.0, 4.0))
        named.append((ct, labels, f"phantom{k}"))
    if len(named) < 2:
        raise ValueError("cross-validation needs at least two cases (add --phantoms)")
    recipes = load_recipes(Settings().shipped_support_dir / "recipes")
    records, notes = [], []
    for held_ct, held_labels, name in named:
        fold = out / "folds" / name
        others = [(ct, labels) for ct, labels, other in named if other != name]
        for structure in structures:
            build_support_set(structure, structure, others, fold / "support" / structure, size=support_set_size,
                              recipe=recipes.get(structure), preview=False,
                              symmetric=not default_definition(structure).lateral,
                              description=f"cross-validation fold without {name}")
        segmenter = Segmenter(weights=weights, device=device, support_dirs=[fold / "support"], shipped_support=False)
        segmenter.segment(held_ct, fold / "prediction",
                          SegmentOptions(structures=structures, support_size=support_size, preview=False))
        records += evaluate_pairs(pair_inputs(fold / "prediction", held_labels, structures, case=name), tolerances_mm)
    notes.append(f"leave-one-case-out over {len(named)} cases ({phantoms} synthetic phantoms); support sets of "
                 f"{support_set_size} slices built with the shipped recipes")
    write_report(records, out, tolerances_mm, notes=notes)
    return records
