"""Installs `ouro_jax_lm_eval.pth` beside the package (wheel and editable installs), so lm_eval finds the
`ouro_jax` backend by name. Everything else about the package is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "ouro_jax_lm_eval.pth"
# Runs ouro_jax/evaluation/lm_eval_hook.py as a standalone module (the ouro_jax package is not imported).
PTH_LINE = (
    "import importlib.util as _u, os as _os; _s = _u.find_spec('ouro_jax'); "
    "_f = _s and _s.origin and _os.path.join(_os.path.dirname(_s.origin), 'evaluation', 'lm_eval_hook.py'); "
    "_m = _f and _os.path.isfile(_f) and "
    "_u.module_from_spec(_u.spec_from_file_location('_ouro_jax_lm_eval_hook', _f)); "
    "_m and _m.__spec__.loader.exec_module(_m)\n"
)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    """Adds the .pth to editable wheels too (setuptools builds those without build_py's extra files)."""

    def _select_strategy(self, *args, **kwargs):
        return _WithPth(super()._select_strategy(*args, **kwargs))


class _WithPth:
    def __init__(self, strategy):
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        self._strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE)

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self._strategy.__exit__(*exc)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
