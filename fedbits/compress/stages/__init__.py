"""The built-in codec stages, one module per family; each registers its stages at
import (:func:`fedbits.compress.register_stage`). The registry imports every module
here, so a new built-in stage is a new module and nothing else."""
