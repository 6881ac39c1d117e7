"""Python kernel driver: one persistent namespace fed cell by cell by the kernel manager.

Protocol (shared with the shell and JavaScript drivers, described in protocol.ts): an execution
arrives on fd 8 as a `BASE64(code)` line followed by a `NONCE` line, read only once the code has
run (an `active_lines` flag after the code asks for line reports); reports leave on fd 3 as JSON lines; user output goes to fds 1 and 2, each closed per
execution by a sentinel that carries the nonce. The sentinels go to copies of fds 1 and 2 made at
start, so code that redirects or closes its own (`os.dup2`, `sys.stdout = open(...)`) can neither
hang the execution nor get the sentinel in its file.
"""

import ast
import base64
import builtins
import inspect
import io
import json
import linecache
import os
import signal
import sys
import traceback
import types

# The command channel and the report channel move to descriptors that programs started by user
# code do not inherit (os.dup makes non-inheritable copies); stdin is already /dev/null.
REPORT_FD = os.dup(3)
os.close(3)
COMMANDS = os.fdopen(os.dup(8), "rb")
os.close(8)
OUT_FD = os.dup(1)
ERR_FD = os.dup(2)

DRIVER_PID = os.getpid()
DRIVER_FILE = __file__
COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

# Imports resolve from the working directory first, as in a Jupyter kernel, not from the driver's folder.
sys.path[0] = ""

_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = builtins
sys.modules["__main__"] = _main
NAMESPACE = _main.__dict__
_event_loop = None


def _no_input(prompt=""):
    raise EOFError("input() is not available: this kernel has no interactive stdin, put the data in the code")


builtins.input = _no_input


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def report(message):
    _write_all(REPORT_FD, (json.dumps(message) + "\n").encode("ascii"))


def _flush_user_streams():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _user_traceback(exc):
    if isinstance(exc, SyntaxError) and str(exc.filename).startswith("<cell-"):
        return "".join(traceback.format_exception_only(type(exc), exc))
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = tb.tb_next
    summary = traceback.TracebackException(type(exc), exc, tb or exc.__traceback__)
    summary.stack = traceback.StackSummary.from_list([frame for frame in summary.stack if frame.filename != DRIVER_FILE])
    return "".join(summary.format())


def _run_code(code_obj):
    global _event_loop
    value = eval(code_obj, NAMESPACE)
    if code_obj.co_flags & inspect.CO_COROUTINE:
        import asyncio

        if _event_loop is None:
            _event_loop = asyncio.new_event_loop()
        value = _event_loop.run_until_complete(value)
    return value


# Active lines (Open Interpreter's `active_line`), as upstream's `add_active_line_prints` does
# it but through the report channel: the cell's syntax tree gets a call to this reporter before
# each statement, with the statement's own line number and location, so tracebacks and line
# numbers are the user's. The call names the cell, so a function defined by an earlier cell and
# called now reports nothing (its lines are not this cell's).
LINE_REPORTER = "__oi_active_line__"
_line_cell = None
_last_line = 0


def _active_line(line, cell):
    global _last_line
    if cell != _line_cell or line == _last_line or os.getpid() != DRIVER_PID:
        return
    _last_line = line
    # Formatted by hand: this runs before every statement of a loop.
    _write_all(REPORT_FD, b'{"type":"line","line":%d}\n' % line)


builtins.__dict__[LINE_REPORTER] = _active_line

# Bodies whose first string statement is a docstring: a call before it would make it a plain string.
_DOCSTRING_OWNERS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class _LineReports(ast.NodeTransformer):
    def __init__(self, cell):
        self.cell = cell

    def _call(self, stmt):
        call = ast.Expr(ast.Call(ast.Name(LINE_REPORTER, ast.Load()), [ast.Constant(stmt.lineno), ast.Constant(self.cell)], []))
        for node in ast.walk(call):
            ast.copy_location(node, stmt)
            node.end_lineno, node.end_col_offset = stmt.lineno, stmt.col_offset
        return call

    def _body(self, body, owner):
        instrumented = []
        for index, stmt in enumerate(body):
            self.visit(stmt)
            docstring = index == 0 and isinstance(owner, _DOCSTRING_OWNERS) and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)
            # `from __future__` must come first; `global`/`nonlocal` only declare.
            future = isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"
            if not (docstring or future or isinstance(stmt, (ast.Global, ast.Nonlocal))):
                instrumented.append(self._call(stmt))
            instrumented.append(stmt)
        return instrumented

    def generic_visit(self, node):
        for name, value in ast.iter_fields(node):
            if not isinstance(value, list) or not value:
                continue
            if all(isinstance(item, ast.stmt) for item in value):
                setattr(node, name, self._body(value, node if name == "body" else None))
            else:
                for item in value:
                    if isinstance(item, (ast.excepthandler, ast.match_case)):
                        self.generic_visit(item)
        return node


def run_cell(source, filename, cell=None):
    """Runs a cell; with `cell` (its number), reports its running lines tagged with it."""
    # Registered so tracebacks can quote the user's lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename, "exec")
    trailing = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        trailing = tree.body.pop()
    if cell is not None:
        _LineReports(cell).visit(tree)
    _run_code(compile(tree, filename, "exec", flags=COMPILE_FLAGS))
    if trailing is None:
        return None
    if cell is not None:
        _active_line(trailing.lineno, cell)
    return _run_code(compile(ast.Expression(trailing.value), filename, "eval", flags=COMPILE_FLAGS))


def _png_of_pil(value):
    if not type(value).__module__.startswith("PIL.") or not hasattr(value, "save"):
        return None
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return buffer.getvalue()


def report_value(value):
    if value is None:
        return
    NAMESPACE["_"] = value
    png = _png_of_pil(value)
    if png is not None:
        report({"type": "image", "format": "base64.png", "data": base64.b64encode(png).decode("ascii")})
    else:
        report({"type": "result", "text": repr(value)})


def report_figures():
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    try:
        for number in pyplot.get_fignums():
            buffer = io.BytesIO()
            pyplot.figure(number).savefig(buffer, format="png", bbox_inches="tight")
            report({"type": "image", "format": "base64.png", "data": base64.b64encode(buffer.getvalue()).decode("ascii")})
    except Exception as exc:
        print(f"Could not render a matplotlib figure: {exc!r}", file=sys.stderr)
    finally:
        pyplot.close("all")


def report_error(exc):
    report({"type": "error", "name": type(exc).__name__, "value": str(exc), "traceback": _user_traceback(exc)})


# An interrupt is never ignored: one that arrives outside a cell (as it starts, while its output
# is reported) is kept pending until the execution it was meant for ends, and a cell that starts
# with one pending stops at once.
_interrupt_pending = False
_in_cell = False


def _on_sigint(signum, frame):
    global _interrupt_pending
    if _in_cell:
        raise KeyboardInterrupt
    _interrupt_pending = True


def _start_cell():
    global _in_cell, _interrupt_pending
    _in_cell = True
    if _interrupt_pending:
        _interrupt_pending = False
        raise KeyboardInterrupt


def execute(source, filename, cell=None):
    """Runs one cell; returns its exit code (0 ok, 1 exception, 130 interrupted). `cell`: see run_cell."""
    global _in_cell, _line_cell, _last_line
    error = None
    value = None
    try:
        _line_cell, _last_line = cell, 0
        _start_cell()
        value = run_cell(source, filename, cell)
    except BaseException as exc:
        error = exc
    finally:
        _in_cell = False
        _line_cell = None
        # A child forked by user code must not go on to act as the driver.
        if os.getpid() != DRIVER_PID:
            os._exit(1 if error is not None else 0)
    _flush_user_streams()
    if error is not None:
        report_error(error)
    else:
        try:
            report_value(value)
        except Exception as exc:
            report_error(exc)
            error = exc
    report_figures()
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 0 if error is None else 1


def finish(nonce, exit_code):
    global _interrupt_pending
    _flush_user_streams()
    sentinel = b"\x02oi-end:" + nonce + b"\x03"
    _write_all(OUT_FD, sentinel)
    _write_all(ERR_FD, sentinel)
    _interrupt_pending = False
    report({"type": "done", "nonce": nonce.decode("ascii"), "exit_code": exit_code})


def main():
    global _in_cell
    signal.signal(signal.SIGINT, _on_sigint)
    report({"type": "ready", "version": sys.version.split()[0], "pid": DRIVER_PID})
    count = 0
    while True:
        payload = COMMANDS.readline()
        if not payload:
            return
        count += 1
        exit_code = 1
        fields = payload.split()
        try:
            source = base64.b64decode(fields[0] if fields else b"").decode("utf-8", "replace")
            flags = fields[1:]
            exit_code = execute(source, f"<cell-{count}>", count if b"active_lines" in flags else None)
        except KeyboardInterrupt as exc:
            # The interrupt landed as the user's code ended, before the cell was marked as over.
            _in_cell = False
            report_error(exc)
            exit_code = 130
        finally:
            finish(COMMANDS.readline().strip(), exit_code)


main()
