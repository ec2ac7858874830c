"""The house stays straight: which module may import which, read from the source (ast; nothing is imported).

    schemas  <-  services.common  <-  services.<service>      (and services.cli, services.stack above them)
    services.audit stands alone: the auditor's tool shares no code with the server it checks.

Plus: the domain rules import no HTTP or database driver, the SQL modules no HTTP; nothing of the product or the
bench imports the tests; and every limit is named once, in `schemas/limits.py`.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from services.stack import ROOT

SERVICES = ROOT / "services"
SCHEMAS = ROOT / "schemas"
LOAD = ROOT / "load"
LIMITS = SCHEMAS / "limits.py"
CLIENT = ROOT / "clients" / "python" / "cvl_client"
CLIENT_LIMITS = CLIENT / "limits.py"
OUR_PACKAGES = ("schemas", "services", "tests", "load")
LIMIT_SUFFIXES = ("_MAX", "_MIN", "_S", "_MS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, at any depth (function-level imports included);
    `from a import b` yields both `a` and `a.b`, since `b` may be a module."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def violations(paths: list[Path], forbidden) -> list[str]:
    return sorted({f"{p.relative_to(ROOT)}:{line} imports {m}" for p in paths for line, m in imports(p)
                   if forbidden(m)})


def service_packages() -> list[str]:
    return sorted(p.name for p in SERVICES.iterdir()
                  if p.is_dir() and (p / "__init__.py").exists() and p.name not in ("common", "audit"))


def test_domain_rules_import_no_http_and_no_database_driver():
    domains = sorted(SERVICES.glob("*/domain.py"))
    assert domains
    assert violations(domains, lambda m: within(m, "aiohttp") or within(m, "asyncpg")) == []


def test_sql_modules_import_no_http():
    stores = sorted(SERVICES.glob("*/store.py"))
    assert stores
    assert violations(stores, lambda m: within(m, "aiohttp")) == []


def test_common_imports_no_service_and_not_the_audit_tool():
    above = ["services.audit", "services.cli", "services.stack"] + [f"services.{s}" for s in service_packages()]
    assert violations(sources(SERVICES / "common"), lambda m: any(within(m, a) for a in above)) == []


def test_the_audit_tool_imports_nothing_of_the_server():
    def forbidden(m: str) -> bool:
        return (within(m, "services") and m != "services" and not within(m, "services.audit")) or within(m, "schemas")
    assert violations(sources(SERVICES / "audit"), forbidden) == []


def test_schemas_import_nothing_from_services():
    assert violations(sources(SCHEMAS), lambda m: within(m, "services")) == []


def test_nothing_in_services_or_load_imports_the_tests():
    assert violations(sources(SERVICES, LOAD), lambda m: within(m, "tests")) == []


def test_the_limits_import_nothing_of_ours():
    assert violations([LIMITS], lambda m: any(within(m, p) for p in OUR_PACKAGES)) == []


def _is_number(node: ast.expr) -> bool:
    """A number literal, or arithmetic on number literals only (`7 * 24 * 3600`, `2**63 - 1`, `-1`)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _is_number(node.operand)
    if isinstance(node, ast.BinOp):
        return _is_number(node.left) and _is_number(node.right)
    return False


def test_every_limit_is_named_once_in_the_limits_module():
    """No module but `schemas/limits.py` binds a module-level `*_MAX`, `*_MIN`, `*_S` or `*_MS` to a number.
    The audit tool is exempt: it keeps its own limits, being independent. (Tests are not scanned: their bounds are
    the test's own parameters, not the system's limits.)"""
    found = []
    for path in sources(SERVICES, SCHEMAS, LOAD):
        if path == LIMITS or within(module_name(path), "services.audit"):
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            for target in targets:
                if isinstance(target, ast.Name) and target.id.endswith(LIMIT_SUFFIXES) and _is_number(value):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {target.id}")
    assert found == [], "limits named outside schemas/limits.py"


# --- the client package (clients/python): installable alone --------------------------------------------------------

def client_imports(path: Path) -> list[tuple[int, str]]:
    """Absolute imports of a client module (its relative imports stay inside cvl_client)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.lineno, node.module or ""))
    return found


def test_the_client_imports_nothing_of_the_server():
    paths = sorted(CLIENT.rglob("*.py"))
    assert paths
    bad = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in paths for line, m in client_imports(p)
           if any(within(m, ours) for ours in OUR_PACKAGES)]
    assert bad == []


def test_only_the_cli_of_the_server_uses_the_client():
    paths = [p for p in sources(SERVICES, SCHEMAS, LOAD) if p != SERVICES / "cli.py"]
    assert violations(paths, lambda m: within(m, "cvl_client")) == []


def test_the_clients_limits_are_named_once_in_its_limits_module():
    found = []
    for path in sorted(CLIENT.rglob("*.py")):
        if path == CLIENT_LIMITS:
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
            value = getattr(node, "value", None)
            for target in targets:
                if isinstance(target, ast.Name) and target.id.endswith(LIMIT_SUFFIXES) and _is_number(value):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {target.id}")
    assert found == [], "client limits named outside cvl_client/limits.py"
