"""What the built-in plugins that are imported on demand provide, read without importing them.

Each mapping is the declaration its plugin names in the ``cellscribe.provides`` entry-point group
(``pyproject.toml``; the format is described in :mod:`cellscribe.core.plugins`). A run that uses none of
a plugin's components or hooks never imports it: an RNA run with the ``markers`` model imports neither
the ATAC plugin nor a model library. ``tests/test_architecture.py`` checks that every declaration matches
what its plugin registers.
"""

ATAC = {
    "modality": ["atac"],
    "reader": ["fragments"],
    "reader_suffixes": [".tsv.gz", ".tsv.bgz", ".fragments.gz"],
    "hooks": ["cellscribe_cli_options"],
    "cli_options": ["annotate", "sentences", "activity", "transfer"],
}
TRANSFORMERS = {"backend": ["transformers"], "hooks": ["cellscribe_load_adapter"]}
OPENAI = {"backend": ["openai"]}
FINETUNE = {"trainer": ["lora"]}
RAY = {"executor": ["ray"]}
