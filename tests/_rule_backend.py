"""A deterministic test model: answers from marker genes found in the prompt's cell sentences.

It is a real backend plugin (registered with ``with_plugin``) that reads the same prompts an LLM reads,
so pipeline tests exercise every step except neural generation, in milliseconds.
"""

from __future__ import annotations

from cellscribe import Generation, hookimpl

PANCREAS_RULES = {"GCG": "alpha", "IAPP": "beta", "SST": "delta", "COL1A1": "activated_stellate",
                  "CD68": "macrophage"}


class RuleModel:
    def __init__(self, rules, garbage_for=()):
        self.rules = rules
        self.garbage_for = set(garbage_for)
        self.calls = []

    def _label(self, sentence):
        genes = sentence.split(", ")
        for gene in genes:
            if gene in self.rules:
                return self.rules[gene]
        return None

    def generate(self, prompts, *, settings=None, progress=None, **_):
        out = []
        for p in prompts:
            self.calls.append(p)
            labels = [self._label(s) for s in p.sentences]
            if any(u in self.garbage_for for u in p.unit_ids):
                text = "I cannot tell ¯\\_(ツ)_/¯"
            elif p.decoder == "cellpuzzles":
                text = "<think>markers</think>\n<answer>" + " | ".join(l or "unknown" for l in labels) + "</answer>"
            else:
                text = labels[0] or "no idea at all"
            out.append(Generation(text=text, confidence=(0.9,) * len(p.unit_ids)))
            if progress:
                progress(1)
        return out

    def count_tokens(self, text):
        return len(text.split())

    def info(self):
        return {"backend": "rules", "n_rules": len(self.rules)}


class RuleBackend:
    name = "rules"
    description = "test backend answering from marker genes"

    def __init__(self, rules=PANCREAS_RULES, garbage_for=()):
        self.model = RuleModel(rules, garbage_for)

    def handles(self, spec):
        return spec == "rules"

    def load(self, spec, **options):
        self.model.load_options = options
        return self.model


class RulePlugin:
    def __init__(self, **kw):
        self.backend = RuleBackend(**kw)

    @hookimpl
    def cellscribe_register_backends(self, register):
        register(self.backend)
