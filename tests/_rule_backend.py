"""A deterministic test model: answers from marker genes found in the prompt's cell sentences.

It is a real backend plugin (registered with ``with_plugin``) that reads the same prompts an LLM reads,
so pipeline tests exercise every step except neural generation, in milliseconds.
"""

from __future__ import annotations

from cellscribe import Generation, hookimpl

PANCREAS_RULES = {"GCG": "alpha", "IAPP": "beta", "SST": "delta", "COL1A1": "activated_stellate",
                  "CD68": "macrophage"}


class RuleModel:
    """Names the label of the first rule gene in the sentence (confidence 0.9); answers garbage for the
    units in ``garbage_for``. Subclasses change how one sentence is answered (:meth:`answer`)."""

    #: Text answered when no rule fits.
    unknown = "no idea at all"

    def __init__(self, rules, garbage_for=(), name="rules"):
        self.rules = rules
        self.garbage_for = set(garbage_for)
        self.name = name
        self.calls = []

    def answer(self, sentence):
        """``(label or None, confidence)`` for one cell sentence."""
        for gene in sentence.split(", "):
            if gene in self.rules:
                return self.rules[gene], 0.9
        return None, 0.9

    def generate(self, prompts, *, settings=None, progress=None, **_):
        out = []
        for p in prompts:
            self.calls.append(p)
            answers = [self.answer(s) for s in p.sentences]
            labels = [label for label, _ in answers]
            if any(u in self.garbage_for for u in p.unit_ids):
                text = "I cannot tell ¯\\_(ツ)_/¯"
            elif p.answer.tagged:
                text = p.answer.text([l or "unknown" for l in labels], "markers")
            else:
                text = labels[0] or self.unknown
            if p.answer.tagged:
                confidence = tuple(c for _, c in answers)
            else:
                confidence = (answers[0][1],) * len(p.unit_ids)
            out.append(Generation(text=text, confidence=confidence))
            if progress:
                progress(1)
        return out

    def count_tokens(self, text):
        return len(text.split())

    def info(self):
        return {"backend": self.name, "n_rules": len(self.rules)}


class RuleBackend:
    description = "test backend answering from marker genes"

    def __init__(self, model):
        self.model = model
        self.name = model.name
        self.loads = 0

    def handles(self, spec):
        return spec == self.name

    def load(self, spec, **options):
        self.loads += 1
        self.model.load_options = options
        return self.model


class RulePlugin:
    """The plugin to install with ``with_plugin``: ``RulePlugin(rules=..., garbage_for=...)`` or
    ``RulePlugin(model=a_model)``; the model is ``plugin.backend.model``."""

    def __init__(self, model=None, **kw):
        self.backend = RuleBackend(model if model is not None else RuleModel(kw.pop("rules", PANCREAS_RULES), **kw))

    @hookimpl
    def cellscribe_register_backends(self, register):
        register(self.backend)
