#!/usr/bin/env bash
# Build ./.whl/: the wheels of the Python packages that the (offline) GPU machine lacks, for Python 3.12
# (cp312) on x86-64 Linux. On that machine, `source scripts/gpu_env.sh` installs them into /tmp/site.
#
#   bash scripts/build_gpu_wheelhouse.sh        # rebuilds .whl/ from scratch, then checks it
#
# Versions are pinned below to those that run here with transformers 5.17 / torch 2.1x (the ones in .venv);
# a mismatch with .venv is reported as a warning. deepspeed ships only as an sdist: it is built here, with
# its ops left to JIT (DS_BUILD_OPS=0), against the torch of $VENV (default .venv), into a py3-none-any wheel.
# Other sdist-only packages (sqlitedict, word2number, rouge-score) are built here with `pip wheel`.
#
# The check at the end walks every wheel's Requires-Dist (markers evaluated for CPython 3.12 on Linux x86-64,
# extras followed where a bundled wheel asks for them) and fails when a need is neither bundled nor in the GPU
# machine's package list below, when a bundled version does not satisfy a need, when a need on a GPU package
# whose version is known (GPU_KNOWN_VERSIONS) is not met, when a wheel would shadow a package the machine
# already has, when a wheel's tags don't fit cp312 manylinux x86-64, when a name is bundled twice, or when
# the folder outgrows MAX_MIB.
#
# bitsandbytes (4-bit bases, load_in_4bit) ships one 43 MB wheel with libraries for every CUDA/ROCm/XPU version: it
# is repacked with its CPU and CUDA 13.0 libraries only (the GPU machine's torch is built for CUDA 13.0), its
# RECORD rewritten to match.
#
# Environment: VENV (default .venv), MAX_MIB (default 40), EXTRA_PKGS (more "name==version" pins, space-separated,
# e.g. "alpaca-eval==0.6.6 openai==3.54.0 ..." — the check then names their missing needs).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
MAX_MIB="${MAX_MIB:-40}"
DEST=.whl

# Downloaded as wheels (pure or cp312 manylinux x86-64).
BINARY_PKGS=(
    # training
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    liger-kernel==0.8.5          # latest; needs torch>=2.1.2, triton>=2.3.1 (machine: 2.11.0 / 3.6.0)
    # deepspeed's needs (deepspeed itself is built below)
    hjson==3.1.0
    pydantic==2.14.3
    pydantic-core==2.50.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    # evaluation: lm-eval and its needs
    lm-eval==0.4.13
    evaluate==0.4.6
    pytablewriter==1.2.1
    dataproperty==1.1.1
    mbstrdecoder==1.1.5
    chardet==6.0.0.post1
    pathvalidate==3.3.1
    tabledata==1.3.5
    tcolorpy==0.1.7
    typepy==1.3.5
    pytz==2026.6                 # typepy[datetime]
    nltk==3.10.4                 # rouge-score
    defusedxml==0.7.1            # nltk
    more-itertools==11.2.1
    # GGUF checkpoints (milora.gguf); needs numpy, pyyaml, requests, tqdm, all on the machine
    gguf==0.19.0
    # 4-bit bases (milora.quantization); needs torch, numpy, packaging; repacked below
    bitsandbytes==0.50.2
    # MATH answer equivalence (eval_harness.math_grading) and its needs
    math-verify==0.9.0
    latex2sympy2-extended==1.11.0
    antlr4-python3-runtime==4.13.2
)
# Published as sdists only: built here into pure wheels.
SDIST_PKGS=(
    sqlitedict==2.1.0
    word2number==1.1
    rouge-score==0.1.2
)
DEEPSPEED=deepspeed==0.19.8
# shellcheck disable=SC2206
EXTRA=(${EXTRA_PKGS:-})

# The packages the target GPU image already has (its pip list, read 2026-11-17).
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# Versions known on the GPU machine (its pip list and readings there); needs on these
# packages are checked against them, needs on the other GPU packages by name only.
GPU_KNOWN_VERSIONS="torch==2.11.0 transformers==5.17.0 peft==0.21.0 accelerate==1.15.0 triton==3.6.0
huggingface-hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 numpy==2.5.2 sentencepiece==0.2.2
tiktoken==0.14.0 pyarrow==25"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

[ -x "$VENV/bin/python" ] || { echo "error: $VENV/bin/python not found (deepspeed is built with its torch)" >&2; exit 1; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || { echo "error: $VENV has no torch" >&2; exit 1; }

# Warn where the pins drift from what .venv runs.
"$VENV/bin/python" - "${BINARY_PKGS[@]}" "${SDIST_PKGS[@]}" "$DEEPSPEED" <<'EOF'
import sys, importlib.metadata as md
for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        continue
    if have != want:
        print(f"warning: {name} pinned at {want}, but the venv has {have}", file=sys.stderr)
EOF

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheelhouse.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
OUTDIR="$WORK/whl"
mkdir -p "$OUTDIR"
quiet() { grep -v "^WARNING: Location 'file:" || true; }   # the local indexes' noise

echo "== downloading wheels"
for pkg in "${BINARY_PKGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$OUTDIR" "$pkg" 2>&1 | quiet || { echo "error: could not download $pkg" >&2; exit 1; }
done

echo "== repacking bitsandbytes with its CPU and CUDA 13.0 libraries only"
python3 - "$OUTDIR" <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

KEEP = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}
for wheel in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    repacked = wheel.with_suffix(".repacked")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as target:
        names = [n for n in source.namelist()
                 if not (n.rsplit("/", 1)[-1].startswith("libbitsandbytes_") and n.rsplit("/", 1)[-1] not in KEEP)]
        if not KEEP <= {n.rsplit("/", 1)[-1] for n in names}:
            sys.exit(f"error: {wheel.name} lacks {sorted(KEEP)}")
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        record = []
        for name in names:
            if name == record_name:
                continue
            data = source.read(name)
            target.writestr(source.getinfo(name), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{record_name},,")
        target.writestr(record_name, "\n".join(record) + "\n")
    repacked.replace(wheel)
    print(f"{wheel.name}: {len(names)} files, {wheel.stat().st_size / 1048576:.1f} MiB")
EOF

echo "== building pure wheels from sdists"
for pkg in "${SDIST_PKGS[@]}"; do
    python3 -m pip wheel -q --no-deps --no-cache-dir -w "$OUTDIR" "$pkg" 2>&1 | quiet \
        || { echo "error: could not build $pkg" >&2; exit 1; }
done

echo "== building $DEEPSPEED (DS_BUILD_OPS=0, against $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    -w "$OUTDIR" "$DEEPSPEED" 2>&1 | quiet || { echo "error: could not build $DEEPSPEED" >&2; exit 1; }

rm -rf "$DEST"
mv "$OUTDIR" "$DEST"

echo "== wheels in $DEST"
ls -l "$DEST" | awk 'NR>1 {printf "%10d  %s\n", $5, $9}'
total_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $(awk -v b="$total_bytes" 'BEGIN {printf "%.2f MiB", b/1048576}') in $(ls "$DEST"/*.whl | wc -l) wheels (limit ${MAX_MIB} MiB)"

echo "== checking the wheelhouse against the GPU machine"
GPU_HAS="$GPU_HAS" GPU_KNOWN_VERSIONS="$GPU_KNOWN_VERSIONS" MAX_BYTES=$((MAX_MIB * 1048576)) \
python3 - "$DEST" <<'EOF'
import email.parser, os, sys, zipfile
from pathlib import Path
try:
    from packaging import tags
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip's own copy
    from pip._vendor.packaging import tags
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

dest = Path(sys.argv[1])
gpu_has = {canonicalize_name(n) for n in os.environ["GPU_HAS"].split()}
gpu_ver = {}
for pin in os.environ["GPU_KNOWN_VERSIONS"].split():
    n, _, v = pin.partition("==")
    gpu_ver[canonicalize_name(n)] = Version(v)
problems = []

# Tags the GPU machine's pip takes: CPython 3.12, glibc manylinux x86-64 (up to 2.39), or pure.
plats = [f"manylinux_2_{i}_x86_64" for i in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
ok_tags = set(tags.cpython_tags((3, 12), ["cp312"], plats)) | set(tags.compatible_tags((3, 12), "cp312", plats))

wheels = {}
for whl in sorted(dest.glob("*.whl")):
    _, _, _, wtags = parse_wheel_filename(whl.name)
    if not wtags & ok_tags:
        problems.append(f"{whl.name}: no tag that cp312 manylinux x86-64 accepts")
    with zipfile.ZipFile(whl) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode("utf-8"))
    name = canonicalize_name(meta["Name"])
    if name in wheels:
        problems.append(f"{name}: bundled twice ({wheels[name][2]}, {whl.name})")
    if name in gpu_has:
        problems.append(f"{name}: already on the GPU machine; bundling it would shadow that one")
    wheels[name] = (Version(meta["Version"]), [Requirement(r) for r in meta.get_all("Requires-Dist") or []], whl.name)

env = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", os_name="posix", implementation_name="cpython",
           platform_python_implementation="CPython", platform_release="", platform_version="",
           implementation_version="3.12.3")

def active(req, extras):
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""}))

# Extras asked of bundled wheels by other bundled wheels (e.g. typepy[datetime]); iterate to a fixed point.
wanted_extras = {n: set() for n in wheels}
changed = True
while changed:
    changed = False
    for n, (_, reqs, _) in wheels.items():
        for r in reqs:
            dep = canonicalize_name(r.name)
            if dep in wheels and active(r, wanted_extras[n]) and not r.extras <= wanted_extras[dep]:
                wanted_extras[dep] |= set(r.extras)
                changed = True

missing, unchecked = {}, set()
for n, (ver, reqs, fname) in sorted(wheels.items()):
    for r in reqs:
        if not active(r, wanted_extras[n]):
            continue
        dep = canonicalize_name(r.name)
        if dep in wheels:
            if not r.specifier.contains(wheels[dep][0], prereleases=True):
                problems.append(f"{n} {ver} needs {r}, bundled: {dep} {wheels[dep][0]}")
        elif dep in gpu_has:
            if dep in gpu_ver and not r.specifier.contains(gpu_ver[dep], prereleases=True):
                problems.append(f"{n} {ver} needs {r}, GPU machine has {dep} {gpu_ver[dep]}")
            if r.extras:
                unchecked.add(f"{dep}[{','.join(sorted(r.extras))}]")
        else:
            missing.setdefault(dep, []).append(f"{n} ({r})")

for dep, who in sorted(missing.items()):
    problems.append(f"missing: {dep}, needed by {', '.join(who)}")
total = sum(p.stat().st_size for p in dest.glob("*.whl"))
if total > int(os.environ["MAX_BYTES"]):
    problems.append(f"size: {total / 1048576:.2f} MiB is over the limit of {int(os.environ['MAX_BYTES']) / 1048576:.0f} MiB")
if unchecked:
    print("note: extras of GPU-machine packages not checked here:", ", ".join(sorted(unchecked)))
if problems:
    print(f"FAILED: {len(problems)} problem(s)")
    for p in problems:
        print("  " + p)
    sys.exit(1)
print(f"OK: {len(wheels)} wheels; every need is bundled or on the GPU machine")
EOF
