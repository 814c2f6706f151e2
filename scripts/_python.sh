# Sourced by the scripts in this folder (needs ROOT set): picks the project's Python into PY:
# the active virtual environment, else the repository's .venv (scripts/install.sh makes it),
# else python3 on PATH.
if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
  PY="$(command -v python3)"
else
  echo "$(basename "$0"): no Python found; run scripts/install.sh first" >&2
  exit 1
fi
