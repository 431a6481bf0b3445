"""A deterministic PBMC test model for evaluation tests: answers from canonical marker genes.

Like ``_rule_backend`` it is a real backend plugin (install it with ``with_plugin``) that reads the
cell sentences of the prompts. Each rule names a label, genes that must all be in the sentence and
genes that must not be; the first rule that fits answers, and the confidence falls with the position
of the rule's first gene in the sentence, so confidences spread over [0.3, 1] and calibration plots
have something to show.
"""

from __future__ import annotations

from _rule_backend import RuleModel, RulePlugin

#: (label, required genes, forbidden genes) for scanpy's pbmc68k_reduced, checked in order. Labels
#: are spelled as a model would ("NK cells"), not as the data's bulk_labels ("CD56+ NK").
PBMC_RULES = (
    ("NK cells", ("GNLY", "NKG7"), ("CD3D",)),
    ("CD8+ T cells", ("NKG7", "CD3D"), ()),
    ("B cells", ("CD79A",), ()),
    ("CD14+ Monocytes", ("AIF1", "LST1"), ()),
    ("Dendritic cells", ("CST3", "HLA-DRA"), ()),
    ("CD4+ T cells", ("CD3D",), ()),
    ("CD34+", ("SNHG7",), ()),
)


class MarkerModel(RuleModel):
    """The first rule whose required genes are all in the sentence and forbidden genes absent answers."""

    unknown = "Unknown"

    def __init__(self, rules=PBMC_RULES):
        super().__init__(rules, name="pbmc-markers")

    def answer(self, sentence):
        genes = sentence.split(", ")
        position = {g: i for i, g in enumerate(genes)}
        for label, required, forbidden in self.rules:
            if all(g in position for g in required) and not any(g in position for g in forbidden):
                first = min(position[g] for g in required)
                return label, round(1.0 - 0.7 * first / max(len(genes), 1), 3)
        return None, None


def MarkerPlugin(rules=PBMC_RULES) -> RulePlugin:
    """The plugin to install with ``with_plugin`` (backend name ``"pbmc-markers"``)."""
    return RulePlugin(model=MarkerModel(rules))
