"""Fail when a module imports anything outside the standard library and its siblings."""
import ast
import sys

ALLOWED = set(sys.stdlib_module_names) | {"store", "rendezvous", "elastic", "__future__"}


def offending_imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in ALLOWED:
                yield "%s:%d imports %s" % (path, node.lineno, name)


bad = [line for path in sys.argv[1:] for line in offending_imports(path)]
print("\n".join(bad) or "only the standard library: %s" % " ".join(sys.argv[1:]))
sys.exit(1 if bad else 0)
