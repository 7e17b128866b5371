"""The import layers, highest first: the one table ``tests/test_layers.py`` enforces and
``docs/architecture.md`` describes. Nothing imports this module at run time.

A module may import its own layer (without forming a cycle) and any layer below it, at the top
of the file. A group is a module or a package prefix (``contsup.tools`` holds every
``contsup.tools.*``); ``contsup`` alone is the facade, ``contsup/__init__.py``.
"""

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("facade", ("contsup",)),  # contsup/__init__.py: re-exports, anything above core loaded lazily
    ("cli", ("contsup.cli", "contsup.__main__")),
    ("tools", ("contsup.tools", "contsup.testing")),
    ("api", ("contsup.api",)),
    ("distributed", ("contsup.distributed",)),
    ("training", ("contsup.training",)),
    ("model", ("contsup.model",)),
    ("config", ("contsup.config",)),
    ("core", ("contsup.core",)),
    ("plugin API", (
        "contsup.adapters", "contsup.errors", "contsup.hookspecs", "contsup.layers", "contsup.options", "contsup.partition",
        "contsup.protocols", "contsup.suggest", "contsup.types",
    )),
)

# Built-in plugins (plugins/contsup_*) may import the plugin API and their own package only.
PLUGIN_LAYER = "built-in plugin"
PLUGIN_MAY_IMPORT = ("plugin API",)

# What the facade may import at the top of contsup/__init__.py: every import of a contsup module,
# and every plugin's ``from contsup import hookimpl``, runs it first.
FACADE_TOP_LEVEL = ("core", "plugin API")

# Where a function may import a project module (start-up time of the command line; the facade's
# lazy re-exports). A plugin package may also import its own submodules inside functions.
LAZY_IMPORTS_ALLOWED = ("contsup.cli", "contsup")
