"""Import and export of peer libraries' on-disk SAE formats (SAELens 6, EleutherAI sparsify), read and written
directly with safetensors + json because neither package installs beside TransformerLens 4."""

from lm_saes_core.interop.saelens import InteropError, export_saelens, import_saelens, upgrade_saelens_config
from lm_saes_core.interop.sparsify import export_sparsify, import_sparsify, sparsify_hook_points, sparsify_hookpoint

__all__ = [
    "InteropError",
    "export_saelens",
    "export_sparsify",
    "import_saelens",
    "import_sparsify",
    "sparsify_hook_points",
    "sparsify_hookpoint",
    "upgrade_saelens_config",
]
