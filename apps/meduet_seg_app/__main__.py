"""``python apps/meduet_seg_app -i ... -o ... -m ...``: the app folder as a module, the form the MAP packager
(``monai-deploy package <this folder>``) runs in its container (``python3 /opt/holoscan/app``)."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
