"""twotower: train, search, evaluate and report on two-tower retrieval models.

The Python API (see the README):

    import twotower_cli
    model = twotower_cli.load("runs/latest")
    hits = model.search("gnu c compiler", k=5)[0]
"""

__version__ = "0.2.0"
__all__ = ["load", "TwoTowerModel", "Hit", "__version__"]


def __getattr__(name: str):
    # imported on first use, so that `twotower --help` and `import twotower_cli` stay instant
    if name in ("load", "TwoTowerModel", "Hit"):
        from twotower_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'twotower_cli' has no attribute {name!r}")
