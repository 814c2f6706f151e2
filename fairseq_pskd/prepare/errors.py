"""The one exception type of the prepare package."""


class PrepareError(RuntimeError):
    """A problem the user can fix (bad input, missing tool); main() prints it without a traceback
    and exits with status 1."""


def require(module: str, pip_name: str):
    """Import ``module`` or raise a PrepareError that says how to install it."""
    import importlib
    import sys

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise PrepareError(
            f"{pip_name} is not importable ({e}); install it into this Python "
            f"({sys.executable}) with `pip install {pip_name}` or run scripts/install.sh"
        ) from e
