"""``monai-deploy package`` (holoscan-cli 4.2.0) run for real up to its container build, which cannot run here.

    <deploy python> tests/unit/deploy/map_dryrun.py <keep dir> <monai-deploy package arguments...>

The packager's own driver runs on the given arguments (its argument parser, the app.yaml reader, app.json and
pkg.json, the copy of the app folder, its requirements.txt and the models into the build context, the Dockerfile from
its template); only ``BuilderBase._build_internal`` (``docker buildx build``: no Docker daemon and no buildx here) is
replaced by a copy of the finished build context to ``<keep dir>``: ``map/app.json``, ``map/pkg.json``, ``app/``,
``models/``, ``pip/requirements.txt``, ``Dockerfile``. Exit status: the packager's (0 = every platform staged).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    keep = Path(argv[0])
    from holoscan_cli import __main__ as cli
    from holoscan_cli.packager.container_builder import BuilderBase
    from holoscan_cli.packager.parameters import PlatformBuildResults

    def stage_only(self, dockerfile: str, platform_parameters) -> PlatformBuildResults:
        shutil.copytree(self._temp_dir, keep, dirs_exist_ok=True)
        result = PlatformBuildResults(platform_parameters)
        result.succeeded = True
        return result

    BuilderBase._build_internal = stage_only
    sys.argv[0] = "monai-deploy"  # the packager picks the SDK (MONAI Deploy -> a MAP) by the command's name
    try:
        cli.main(["monai-deploy", "package", *argv[1:]])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
