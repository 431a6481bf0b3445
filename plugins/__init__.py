"""Built-in plugins. Each subpackage is registered through the ``cellscribe`` entry-point group
(see ``pyproject.toml``), exactly like a third-party plugin; none imports another."""
