"""A deterministic PBMC test model for evaluation tests: answers from canonical marker genes.

Like ``_rule_backend`` it is a real backend plugin (install it with ``with_plugin``) that reads the
cell sentences of the prompts. Each rule names a label, genes that must all be in the sentence and
genes that must not be; the first rule that fits answers, and the confidence falls with the position
of the rule's first gene in the sentence, so confidences spread over [0.3, 1] and calibration plots
have something to show.
"""

from __future__ import annotations

from cellscribe import Generation, hookimpl

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


class MarkerModel:
    def __init__(self, rules=PBMC_RULES):
        self.rules = rules

    def _answer(self, sentence):
        genes = sentence.split(", ")
        position = {g: i for i, g in enumerate(genes)}
        for label, required, forbidden in self.rules:
            if all(g in position for g in required) and not any(g in position for g in forbidden):
                first = min(position[g] for g in required)
                return label, round(1.0 - 0.7 * first / max(len(genes), 1), 3)
        return "Unknown", None

    def generate(self, prompts, *, settings=None, progress=None, **_):
        out = []
        for prompt in prompts:
            label, confidence = self._answer(prompt.sentences[0])
            out.append(Generation(text=label, confidence=(confidence,) * len(prompt.unit_ids)))
            if progress:
                progress(1)
        return out

    def count_tokens(self, text):
        return len(text.split())

    def info(self):
        return {"backend": "pbmc-markers", "n_rules": len(self.rules)}


class MarkerBackend:
    name = "pbmc-markers"
    description = "test backend answering PBMC cell types from marker genes"

    def __init__(self, rules=PBMC_RULES):
        self.model = MarkerModel(rules)

    def handles(self, spec):
        return spec == self.name

    def load(self, spec, **options):
        return self.model


class MarkerPlugin:
    def __init__(self, **kw):
        self.backend = MarkerBackend(**kw)

    @hookimpl
    def cellscribe_register_backends(self, register):
        register(self.backend)
