"""Old home of ``decode_linears``: this name is ``hcr_kernels.patches`` itself.

The module object is replaced (not its names copied), so monkeypatching
``hcr_kernels.decode_linear.patch.apply_decode_linear`` reaches the routed forward.
"""

import sys

from hcr_kernels import patches

sys.modules[__name__] = patches
