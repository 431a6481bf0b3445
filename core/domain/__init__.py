"""Domain libraries shared by core and plugins: gene identifiers (:mod:`.genes`), the Cell Ontology
(:mod:`.ontology`), ranking genes into sentences (:mod:`.ranking`), reading matrices in row chunks
(:mod:`.matrix`) and model manifests (:mod:`.manifests`).

They know nothing of plugins or of a run; each is imported only by what uses it.
"""
