"""Old home of ``apply_hcr_kernels_to_mamba``: this name is ``hcr_kernels.patches`` itself.

The module object is replaced (not its names copied), so ``hcr_kernels.mamba_patch.X`` and
``hcr_kernels.patches.X`` are one attribute, monkeypatching included.
"""

import sys

from hcr_kernels import patches

sys.modules[__name__] = patches
