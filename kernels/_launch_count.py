"""Count the GPU kernel launches of a block of code on a machine without a GPU (tests and ``bench.static`` only).

Nothing in the library imports this module. :class:`LaunchCounter` records, while active:

* every Triton kernel launch (``kernel[grid](...)``, interpreted or compiled through the stub driver
  of :mod:`._gpu_compile`) by kernel name;
* every aten op that would be a kernel on a GPU (a ``TorchDispatchMode``): all of them except views
  and the ops that only allocate or alias (``empty``, ``detach``, ...). The bodies of dsfast's custom
  ops are counted too (the mode would otherwise see only the custom op itself).

The same code run on CPU tensors under ``TRITON_INTERPRET=1`` (or on meta tensors) then tells how many
launches it makes on a GPU.
"""
from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# aten ops that allocate or alias without launching anything
NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
             "aten::detach", "aten::alias", "aten::lift_fresh"}


class _AtenCounter(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:  # a custom op (from torch.library.custom_op): count what its body runs
            with _AtenCounter(self.ops):
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        writes = any(isinstance(t, torch.Tensor) for t in tree_leaves(out))  # not e.g. promote_types
        if writes and not func.is_view and func._schema.name not in NO_KERNEL:
            self.ops.append(func._schema.name)
        return out


class LaunchCounter:
    """``with LaunchCounter() as c: ...``; then ``c.triton`` (kernel names), ``c.torch`` (aten op names), ``c.total``."""

    def __enter__(self):
        self.triton, self.torch = [], []
        self._patched = []
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(kernel, *args, _original=original, **kwargs):
                self.triton.append(kernel.fn.__name__)
                with _disable_current_modes():  # the interpreter's own tensor ops are no launches
                    return _original(kernel, *args, **kwargs)

            cls.run = run
            self._patched.append((cls, original))
        self._mode = _AtenCounter(self.torch)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for cls, original in self._patched:
            cls.run = original

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.torch)
