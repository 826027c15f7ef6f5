"""What the README's set-up installs: every required package is one the code imports, and the
CPU-only PyTorch install is a command to copy, not a remark inside a comment."""
import ast
import re

from conftest import ROOT

# The name each distribution is imported by, where the two differ.
IMPORT_NAMES = {"pillow": "PIL", "scikit-image": "skimage"}


def requirements(path) -> list[str]:
    """The distribution names a requirements file lists, without versions or comments."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.split(r"[<>=!~\[; ]", line)[0].lower())
    return names


def imported_packages() -> set[str]:
    """The top-level packages the product's modules (not the tests) import."""
    found = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("machinery/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_required_package_is_imported_by_the_code():
    unused = [name for name in requirements(ROOT / "requirements.txt")
              if IMPORT_NAMES.get(name, name) not in imported_packages()]
    assert unused == [], f"requirements.txt installs packages no module imports: {unused}"


def test_the_cpu_only_install_is_a_command_of_its_own():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
                for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    cpu_only = [c for c in commands if "download.pytorch.org/whl/cpu" in c]
    assert cpu_only == ["pip install torch --index-url https://download.pytorch.org/whl/cpu"], commands
