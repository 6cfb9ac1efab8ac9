"""Import this before torchvision or transformers in the tools/ scripts.

A torchvision wheel whose compiled operators do not match the installed torch (for instance a CUDA
build of torchvision beside a CPU build of torch) fails while registering those operators; the model
definitions these scripts use are plain Python and never call them. Stubbing the registration module
lets torchvision, and transformers (which imports torchvision when present), load.
"""
import sys
import types

try:
    import torchvision  # noqa: F401
except RuntimeError:
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401
except ImportError:
    pass
