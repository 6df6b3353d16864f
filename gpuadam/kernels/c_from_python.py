"""The rules' scalar functions in C, translated from their Python: no second hand-written copy.

The cupy backend computes a step's constants on the device (clipping, skipping, ``capturable``)
without Numba, so it needs each rule's constants function and ``grad_factor`` in CUDA C.
``c_functions(fn)`` translates ``fn`` and every function of its module it calls into C functions
on ``double``, in the order C needs them. It takes the small subset of Python those functions are
written in, and refuses anything else by name: assignments (a name, or a tuple of names from a
tuple parameter or from a call returning a tuple), ``+= -= *= /=``, ``if/elif/else``, ``for n in
range(a, b)`` with ``break``, arithmetic, comparisons, ``and``/``or``/``not``, ``x if c else y``,
``math`` functions, ``min``/``max``, and ``return`` of a number or of a tuple.

A tuple parameter becomes a pointer to doubles; a function returning a tuple writes it through a
trailing ``double* out``. Float literals are written with ``repr``, which C reads back to the
same double. ``tests/test_c_from_python.py`` runs the C on the host against the Python.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable

_MATH = {"sqrt": "sqrt", "pow": "pow", "exp": "exp", "expm1": "expm1", "log": "log", "log1p": "log1p",
         "fabs": "fabs", "isfinite": "isfinite"}
_BUILTINS = {"min": "fmin", "max": "fmax", "abs": "fabs"}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}

#: The prefix of every translated function's C name: no clash with the C library (``log``...).
PREFIX = "py_"


class Unsupported(ValueError):
    """Python the translator does not take (with the function and line)."""


def _source_tree(fn: Callable) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise Unsupported(f"{fn.__name__}: not a plain function")
    return node


def _returns_tuple(node: ast.FunctionDef) -> int:
    """The length of the tuple ``node`` returns, 0 if it returns a number."""
    sizes = {len(r.value.elts) if isinstance(r.value, ast.Tuple) else 0
             for r in ast.walk(node) if isinstance(r, ast.Return)}
    if len(sizes) != 1:
        raise Unsupported(f"{node.name}: every return must give the same kind of value")
    return sizes.pop()


class _Translator:
    def __init__(self, fn: Callable, node: ast.FunctionDef, callees: dict[str, tuple[Callable, ast.FunctionDef]]):
        self.fn = fn
        self.node = node
        self.callees = callees
        self.params = [a.arg for a in node.args.args]
        # a parameter unpacked as a tuple is a pointer
        self.tuples = {s.value.id for s in ast.walk(node) if isinstance(s, ast.Assign)
                       and isinstance(s.targets[0], ast.Tuple) and isinstance(s.value, ast.Name)}
        self.ints = {s.target.id for s in ast.walk(node) if isinstance(s, ast.For)}
        self.out = _returns_tuple(node)
        self.temps = 0

    def fail(self, node: ast.AST, what: str) -> Unsupported:
        line = self.node.lineno + getattr(node, "lineno", 1) - 1
        return Unsupported(f"{self.fn.__name__} (line {line} of its source): {what} cannot be translated to C")

    # --- expressions
    def expr(self, e: ast.expr) -> str:
        if isinstance(e, ast.Constant) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool):
            return repr(float(e.value)) if isinstance(e.value, float) else f"{e.value}LL"
        if isinstance(e, ast.Name):
            if e.id in self.tuples:
                raise self.fail(e, f"the tuple {e.id!r} used as a value")
            return e.id
        if isinstance(e, ast.BinOp) and type(e.op) in _BINOPS:
            return f"({self.expr(e.left)} {_BINOPS[type(e.op)]} {self.expr(e.right)})"
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.USub, ast.Not)):
            return f"({'-' if isinstance(e.op, ast.USub) else '!'}{self.expr(e.operand)})"
        if isinstance(e, ast.Compare) and len(e.ops) == 1 and type(e.ops[0]) in _COMPARE:
            return f"({self.expr(e.left)} {_COMPARE[type(e.ops[0])]} {self.expr(e.comparators[0])})"
        if isinstance(e, ast.BoolOp):
            op = " && " if isinstance(e.op, ast.And) else " || "
            return "(" + op.join(self.expr(v) for v in e.values) + ")"
        if isinstance(e, ast.IfExp):
            return f"({self.expr(e.test)} ? {self.expr(e.body)} : {self.expr(e.orelse)})"
        if isinstance(e, ast.Call) and not e.keywords:
            name = self.callee(e)
            return f"{name}({', '.join(self.expr(a) for a in e.args)})"
        raise self.fail(e, f"the expression {ast.unparse(e)!r}")

    def callee(self, call: ast.Call, tuple_result: bool = False) -> str:
        f = call.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math" and f.attr in _MATH:
            return _MATH[f.attr]
        if isinstance(f, ast.Name) and f.id in _BUILTINS:
            return _BUILTINS[f.id]
        if isinstance(f, ast.Name):
            target = self.fn.__globals__.get(f.id)
            target = getattr(target, "py_func", target)
            if inspect.isfunction(target):
                node = _source_tree(target)
                if bool(_returns_tuple(node)) != tuple_result:
                    kind = "a tuple" if not tuple_result else "a number"
                    raise self.fail(call, f"{f.id} returns {kind} here; the call")
                self.callees.setdefault(f.id, (target, node))
                return PREFIX + f.id
        raise self.fail(call, f"the call {ast.unparse(call)!r}")

    # --- statements
    def block(self, body: list[ast.stmt], depth: int) -> list[str]:
        lines = []
        for s in body:
            lines += self.stmt(s, depth)
        return lines

    def stmt(self, s: ast.stmt, depth: int) -> list[str]:
        pad = "  " * depth
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
            return []  # a docstring
        if isinstance(s, ast.Pass):
            return []
        if isinstance(s, ast.Break):
            return [pad + "break;"]
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            target = s.targets[0]
            if isinstance(target, ast.Name):
                return [f"{pad}{target.id} = {self.expr(s.value)};"]
            if isinstance(target, ast.Tuple) and all(isinstance(t, ast.Name) for t in target.elts):
                names = [t.id for t in target.elts]
                if isinstance(s.value, ast.Name) and s.value.id in self.tuples:
                    return [f"{pad}{n} = {s.value.id}[{k}];" for k, n in enumerate(names)]
                if isinstance(s.value, ast.Call):
                    temp = f"tuple_{self.temps}"
                    self.temps += 1
                    args = ", ".join([*(self.expr(a) for a in s.value.args), temp])
                    return [f"{pad}double {temp}[{len(names)}];", f"{pad}{self.callee(s.value, True)}({args});",
                            *(f"{pad}{n} = {temp}[{k}];" for k, n in enumerate(names))]
        if isinstance(s, ast.AugAssign) and isinstance(s.target, ast.Name) and type(s.op) in _BINOPS:
            return [f"{pad}{s.target.id} {_BINOPS[type(s.op)]}= {self.expr(s.value)};"]
        if isinstance(s, ast.If):
            lines = [f"{pad}if ({self.expr(s.test)}) {{", *self.block(s.body, depth + 1)]
            if s.orelse:
                lines += [f"{pad}}} else {{", *self.block(s.orelse, depth + 1)]
            return [*lines, pad + "}"]
        if (isinstance(s, ast.For) and isinstance(s.target, ast.Name) and isinstance(s.iter, ast.Call)
                and isinstance(s.iter.func, ast.Name) and s.iter.func.id == "range" and len(s.iter.args) == 2
                and not s.orelse):
            n = s.target.id
            lo, hi = (self.expr(a) for a in s.iter.args)
            return [f"{pad}for ({n} = {lo}; {n} < {hi}; ++{n}) {{", *self.block(s.body, depth + 1), pad + "}"]
        if isinstance(s, ast.Return) and s.value is not None:
            if self.out:
                return [*(f"{pad}out[{k}] = {self.expr(v)};" for k, v in enumerate(s.value.elts)), pad + "return;"]
            return [f"{pad}return {self.expr(s.value)};"]
        raise self.fail(s, f"the statement {ast.unparse(s).splitlines()[0]!r}")

    def function(self) -> str:
        body = self.block(self.node.body, 1)
        assigned = {t.id for s in ast.walk(self.node) for t in _targets(s)} - set(self.params)
        doubles = sorted(assigned - self.ints)
        params = [f"const double* {p}" if p in self.tuples else f"double {p}" for p in self.params]
        if self.out:
            params.append("double* out")
        head = f"GPUADAM_FN {'void' if self.out else 'double'} {PREFIX}{self.node.name}({', '.join(params)}) {{"
        decls = [f"  double {n} = 0.0;" for n in doubles] + [f"  long long {n} = 0;" for n in sorted(self.ints)]
        decls += [f"  (void){p};" for p in self.params]  # a rule may not read every argument
        return "\n".join([head, *decls, *body, "}"]) + "\n"


def _targets(s: ast.AST) -> list[ast.Name]:
    if isinstance(s, ast.Assign):
        targets = s.targets[0].elts if isinstance(s.targets[0], ast.Tuple) else s.targets
        return [t for t in targets if isinstance(t, ast.Name)]
    if isinstance(s, (ast.AugAssign, ast.For)) and isinstance(s.target, ast.Name):
        return [s.target]
    return []


def tuple_length(fn: Callable) -> int:
    """How many values ``fn``'s tuple parameter holds: the length of its unpacking (0 if none)."""
    node = _source_tree(getattr(fn, "py_func", fn))
    unpacks = [len(s.targets[0].elts) for s in ast.walk(node) if isinstance(s, ast.Assign)
               and isinstance(s.targets[0], ast.Tuple) and isinstance(s.value, ast.Name)]
    return max(unpacks, default=0)


def c_functions(fn: Callable) -> str:
    """C source of ``fn`` (named ``PREFIX + fn.__name__``) and of the functions it calls, callees
    first, each ``GPUADAM_FN`` (see ``cupy_lowp.FN_SOURCE``)."""
    fn = getattr(fn, "py_func", fn)
    callees: dict[str, tuple[Callable, ast.FunctionDef]] = {}
    done: dict[str, str] = {}
    order: list[str] = []

    def visit(f: Callable, node: ast.FunctionDef) -> None:
        if node.name in done:
            return
        before = set(callees)
        text = _Translator(f, node, callees).function()
        for name in [n for n in callees if n not in before]:
            visit(*callees[name])
        done[node.name] = text
        order.append(node.name)

    visit(fn, _source_tree(fn))
    return "".join(done[name] for name in order)
