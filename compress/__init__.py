"""compress: an edge-deployment compression compiler.

A teacher model goes in; a distilled, quantized, exported, benchmarked build per
target comes out. See README.md for the flow and DESIGN.md for the contract.
"""

__version__ = "0.1.0"


def _mount_checkout_subpackages() -> None:
    """Installed, targets/ and kernels/ live inside this package. In a source
    checkout they sit beside it; when this package is imported from the checkout
    (e.g. `python -m compress` in the repo root after `pip install .`), mount
    them under the same names so compress.targets always means the same files."""
    import sys
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for name in ("targets", "kernels"):
        full = f"{__name__}.{name}"
        init = here.parent / name / "__init__.py"
        if full in sys.modules or (here / name).is_dir() or not init.is_file():
            continue
        spec = spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_mount_checkout_subpackages()
