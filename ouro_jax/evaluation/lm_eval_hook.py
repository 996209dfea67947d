"""Registers the `ouro_jax` backend with lm-eval the moment lm_eval's model registry is imported.

Executed at interpreter start-up by `ouro_jax_lm_eval.pth` (installed beside the package), so
`lm_eval --model ouro_jax ...` works without a plugin flag. It must stay cheap: it imports neither
ouro_jax nor lm_eval, only wraps the loader of `lm_eval.api.registry`; after that module runs, lm_eval's
own models and a lazy placeholder for ours are registered (nothing heavy is imported until used).
"""

import importlib.abc
import importlib.machinery
import sys

_REGISTRY = "lm_eval.api.registry"
_TARGET = "ouro_jax.evaluation.lm_eval_adapter:OuroJaxLM"


def _register(module) -> None:
    import lm_eval.models  # noqa: F401 -- registers lm_eval's own placeholders (it skips that when one exists)

    if "ouro_jax" not in module.model_registry:
        module.model_registry.register("ouro_jax", target=_TARGET)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register(module)


class _Finder(importlib.abc.MetaPathFinder):
    ouro_jax_lm_eval_hook = True

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(getattr(f, "ouro_jax_lm_eval_hook", False) for f in sys.meta_path) and _REGISTRY not in sys.modules:
    sys.meta_path.insert(0, _Finder())
