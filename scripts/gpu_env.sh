# Source this ON the GPU machine, from the repository root, at the start of every command:
#
#   source scripts/gpu_env.sh || exit 1; python3 -m milora ...
#
# It installs the wheels of ./.whl (built on a machine with a package index by scripts/build_gpu_wheelhouse.sh,
# then copied along with the repository) into /tmp/site, puts that folder and the repository first on PYTHONPATH (so the bundled packages
# shadow the machine's: .whl holds none that the machine already has), and sets the environment every run
# needs. The install is skipped when /tmp/site already holds exactly these wheels (a second run on the same machine).

_gpu_env_site=/tmp/site
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_env.sh: no wheels in $PWD/.whl (build them with scripts/build_gpu_wheelhouse.sh and copy .whl along)" >&2
    return 1 2>/dev/null || exit 1
fi
_gpu_env_stamp="$(ls -l .whl/*.whl | awk '{print $5, $NF}' | cksum)"
if [ "$(cat "$_gpu_env_site/.wheelhouse-stamp" 2>/dev/null)" != "$_gpu_env_stamp" ]; then
    rm -rf "$_gpu_env_site"
    if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$_gpu_env_site" .whl/*.whl; then
        echo "gpu_env.sh: installing .whl/*.whl into $_gpu_env_site failed" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "$_gpu_env_stamp" >"$_gpu_env_site/.wheelhouse-stamp"
fi
unset _gpu_env_stamp

export PYTHONPATH="$_gpu_env_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$_gpu_env_site/bin:$PATH"   # console scripts of the bundled packages (deepspeed, lm_eval, trl, ...)
unset _gpu_env_site
# NVLink multicast stays off (it can take the host's shared GPUs down); the machine has no network.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
