"""MeDUET bundles: the shared library every bundle imports (networks, contracts, engines, workflows)."""

from meduet.errors import install_excepthook

__version__ = "0.1.0"

install_excepthook()


def _verify_if_packaged() -> None:
    # a copy vendored in a downloaded bundle checks that bundle's files before anything of it is used
    from pathlib import Path

    if (Path(__file__).parent / "_packaged.json").is_file():
        from meduet.integrity import verify_on_import

        verify_on_import(Path(__file__).parent)


_verify_if_packaged()
