r"""Published I3D checkpoints -> the `.npz` that sora_jax.evaluation.i3d loads.

    python -m sora_jax.evaluate --import_i3d=rgb_imagenet.pt --i3d_out=i3d_k400.npz \
        [--i3d_layout=auto|pytorch|tensorflow] [--i3d_bn_eps=0.001]

Two layouts of the same network are read (`LAYOUTS`):

- `pytorch`: the state dict of the PyTorch port of the kinetics-i3d release, the layout
  of `rgb_imagenet.pt` and `i3d_pretrained_400.pt` that most FVD code loads:
  `Conv3d_1a_7x7.conv3d.weight [64, 3, 7, 7, 7]` (out, in, T, H, W),
  `Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var}`,
  `Mixed_3b.b0 | b1a | b1b | b2a | b2b | b3b.<same>` for the branches
  (Branch_0/Conv3d_0a_1x1, Branch_1/Conv3d_0a_1x1, Branch_1/Conv3d_0b_3x3, ...,
  Branch_3/Conv3d_0b_1x1), `logits.conv3d.{weight,bias}`; a `module.` prefix (DataParallel)
  is dropped and `*.num_batches_tracked` is ignored. Read from `.pt`/`.pth` (needs torch,
  which sora_jax does not depend on: install the CPU wheel, or save the state dict as
  `.safetensors` / `.npz` elsewhere), `.safetensors` or `.npz`.
- `tensorflow`: the variables of the TensorFlow release (and of TF-Hub modules built from
  it), as an `.npz` or `.safetensors` of `name -> array` (e.g. written from
  `tf.train.load_checkpoint(path)` by `np.savez`):
  `RGB/inception_i3d/Conv3d_1a_7x7/conv_3d/w [7, 7, 7, 3, 64]`,
  `.../batch_norm/{beta,moving_mean,moving_variance}` (no `gamma`: scale 1),
  `.../Logits/Conv3d_0c_1x1/conv_3d/{w,b}`; any prefix before `inception_i3d/` is dropped.

Batch norm: sora_jax uses the release's eps 1e-3. A source evaluated with another eps
(`bn_eps`; e.g. 1e-5 in some PyTorch copies of the port) is converted exactly by storing
`var + bn_eps - 1e-3` as the variance, since `rsqrt(var + bn_eps)` is all the
inference-form norm uses.

Every name and shape is checked before an array is converted; the `LoadReport` lists the
matched, missing, unexpected, ignored and wrongly shaped tensors, and any problem is an
error naming the file and the tensors. Nothing is downloaded.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import flax
import numpy as np
import safetensors.numpy

from sora_jax.evaluation import i3d
from sora_jax.models.safetensors_io import LoadReport

LAYOUTS = ("auto", "pytorch", "tensorflow")
# Branch units of a mixed block: sora_jax name -> the PyTorch port's attribute.
_TORCH_BRANCH = {
    "Branch_0/Conv3d_0a_1x1": "b0",
    "Branch_1/Conv3d_0a_1x1": "b1a",
    "Branch_1/Conv3d_0b_3x3": "b1b",
    "Branch_2/Conv3d_0a_1x1": "b2a",
    "Branch_2/Conv3d_0b_3x3": "b2b",
    "Branch_3/Conv3d_0b_1x1": "b3b",
}
# sora_jax batch-norm leaf -> (PyTorch, TensorFlow) suffix; TF's norm has no scale.
_BN = {
    ("params", "scale"): ("bn.weight", None),
    ("params", "bias"): ("bn.bias", "batch_norm/beta"),
    ("batch_stats", "mean"): ("bn.running_mean", "batch_norm/moving_mean"),
    ("batch_stats", "var"): ("bn.running_var", "batch_norm/moving_variance"),
}
_TORCH_IGNORED_SUFFIX = ".num_batches_tracked"


def _units(num_classes: int, width_divisor: int) -> list[str]:
    """Every Unit3D of the network, as its sora_jax path ('Mixed_3b/Branch_0/Conv3d_0a_1x1')."""
    return sorted(
        {"/".join(k[1:-2]) for k in i3d.template(num_classes, width_divisor) if k[-2] == "conv"}
    )


def name_map(layout: str, num_classes: int = i3d.NUM_CLASSES, width_divisor: int = 1):
    """`{source name: (sora_jax name, shape in the source)}` of every tensor the network
    needs from a `layout` checkpoint; sora_jax names that the source lacks by design (TF's
    batch-norm scale) are absent."""
    want = i3d.weight_names(num_classes, width_divisor)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for unit in _units(num_classes, width_divisor):
        block, _, branch = unit.partition("/")
        src = f"{block}.{_TORCH_BRANCH[branch]}" if branch else block
        kernel = want[f"params/{unit}/conv/kernel"]  # (T, H, W, in, out)
        if layout == "pytorch":
            out[f"{src}.conv3d.weight"] = (f"params/{unit}/conv/kernel", _torch_kernel(kernel))
        else:
            out[f"{unit}/conv_3d/w"] = (f"params/{unit}/conv/kernel", kernel)
        for (collection, leaf), names in _BN.items():
            name = names[0] if layout == "pytorch" else names[1]
            if name is None:
                continue
            target = f"{collection}/{unit}/bn/{leaf}"
            out[f"{src}.{name}" if layout == "pytorch" else f"{unit}/{name}"] = (
                target,
                want[target],
            )
    logits = want["params/Logits/kernel"]  # (1, 1, 1, D, classes)
    if layout == "pytorch":
        out["logits.conv3d.weight"] = ("params/Logits/kernel", _torch_kernel(logits))
        out["logits.conv3d.bias"] = ("params/Logits/bias", (num_classes,))
    else:
        out["Logits/Conv3d_0c_1x1/conv_3d/w"] = ("params/Logits/kernel", logits)
        out["Logits/Conv3d_0c_1x1/conv_3d/b"] = ("params/Logits/bias", (num_classes,))
    return out


def _torch_kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(T, H, W, in, out) -> PyTorch's Conv3d weight (out, in, T, H, W)."""
    t, h, w, cin, cout = shape
    return (cout, cin, t, h, w)


def read_tensors(path) -> dict[str, np.ndarray]:
    """`name -> array` of a checkpoint file: `.npz`, `.safetensors`, or `.pt`/`.pth` (a
    PyTorch state dict, or a dict holding one under 'state_dict'; needs torch)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D checkpoint {str(path)!r} is not a file: pass the published I3D weights you "
            "have (rgb_imagenet.pt, i3d_pretrained_400.pt, or an .npz/.safetensors of "
            "their tensors); nothing is downloaded"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if suffix == ".safetensors":
        return safetensors.numpy.load_file(str(path))
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        try:
            import torch  # noqa: PLC0415 (optional: sora_jax does not depend on torch)
        except ImportError as e:
            raise ImportError(
                f"I3D checkpoint {path} is a PyTorch file and torch is not installed: "
                "`pip install torch` (the CPU wheel is enough), or save its state dict as "
                ".safetensors / .npz with the same tensor names and pass that"
            ) from e
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(
                f"I3D checkpoint {path} holds a {type(state).__name__}, not a state dict: "
                "save `model.state_dict()`"
            )
        return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
    raise ValueError(
        f"I3D checkpoint {path}: unknown file type {suffix!r}; pass .pt/.pth (PyTorch state "
        "dict), .safetensors or .npz"
    )


def detect_layout(names) -> str:
    """'pytorch' or 'tensorflow', from the tensor names."""
    names = list(names)
    if any(n.endswith(".conv3d.weight") for n in names):
        return "pytorch"
    if any(n.endswith("/conv_3d/w") for n in names):
        return "tensorflow"
    raise ValueError(
        f"no I3D conv weights among the {len(names)} tensors (first: {names[:5]}): expected "
        "PyTorch names ('Conv3d_1a_7x7.conv3d.weight', ...) or TensorFlow names "
        "('RGB/inception_i3d/Conv3d_1a_7x7/conv_3d/w', ...); see sora_jax.evaluation.i3d_import"
    )


def _strip(name: str, layout: str) -> str:
    if layout == "pytorch":
        return name.removeprefix("module.")
    _, found, rest = name.partition("inception_i3d/")
    return rest if found else name


def convert(
    tensors: Mapping[str, np.ndarray],
    *,
    layout: str = "auto",
    bn_eps: float | None = None,
    width_divisor: int | None = None,
    source: str = "I3D checkpoint",
):
    """`(variables, report)`: the source's tensors as sora_jax I3D variables (None when the
    report is not ok). `bn_eps` is the source's batch-norm eps (default: the release's
    1e-3); the class count comes from the logits bias, the width divisor (1 for the
    published network) from the stem conv unless given."""
    if layout not in LAYOUTS:
        raise ValueError(f"I3D layout={layout!r} is unknown; known: {list(LAYOUTS)}")
    layout = detect_layout(tensors) if layout == "auto" else layout
    renamed, ignored = {}, []
    for name, value in tensors.items():
        if layout == "pytorch" and name.endswith(_TORCH_IGNORED_SUFFIX):
            ignored.append(name)
            continue
        renamed[_strip(name, layout)] = (name, np.asarray(value))
    # The class count and width come from the logits bias and the stem conv.
    torch_layout = layout == "pytorch"
    bias_name = "logits.conv3d.bias" if torch_layout else "Logits/Conv3d_0c_1x1/conv_3d/b"
    bias = renamed.get(bias_name, (None, np.zeros(i3d.NUM_CLASSES)))[1]
    num_classes = int(bias.shape[0]) if bias.ndim == 1 else i3d.NUM_CLASSES
    if width_divisor is None:
        stem_name = "Conv3d_1a_7x7.conv3d.weight" if torch_layout else "Conv3d_1a_7x7/conv_3d/w"
        stem = renamed.get(stem_name, (None, np.zeros((64,) * 5)))[1]
        width = int(stem.shape[0 if torch_layout else -1]) if stem.ndim == 5 else 64
        width_divisor = 64 // width if width and 64 % width == 0 else 1
    names = name_map(layout, num_classes, width_divisor)
    loaded, missing, mismatched = [], [], []
    for name, (_, shape) in names.items():
        if name not in renamed:
            missing.append(name)
            continue
        original, value = renamed[name]
        # TF stores norm statistics as [1, 1, 1, 1, C] in some exports: same numbers.
        squeezable = layout == "tensorflow" and value.size == int(np.prod(shape))
        if tuple(value.shape) != shape and not (squeezable and len(shape) == 1):
            mismatched.append((original, shape, tuple(value.shape)))
            continue
        loaded.append(original)
    unexpected = sorted(renamed[n][0] for n in renamed if n not in names)
    report = LoadReport(source, sorted(loaded), missing, unexpected, mismatched, ignored)
    if not report.ok:
        return None, report
    eps = i3d.BN_EPS if bn_eps is None else float(bn_eps)
    flat = {}
    for name, (target, _) in names.items():
        value = renamed[name][1].astype(np.float32)
        if layout == "pytorch" and value.ndim == 5:
            value = value.transpose(2, 3, 4, 1, 0)  # (out, in, T, H, W) -> (T, H, W, in, out)
        if target.endswith("/bn/var"):
            # rsqrt(var' + 1e-3) == rsqrt(var + bn_eps): the source's eps, folded in.
            value = value.reshape(-1) + np.float32(eps - i3d.BN_EPS)
        flat[target] = value
    if layout == "tensorflow":  # the release's norm has no scale
        for unit in _units(num_classes, width_divisor):
            c = flat[f"params/{unit}/bn/bias"].shape[0]
            flat[f"params/{unit}/bn/scale"] = np.ones(c, np.float32)
    return _unflatten(flat, num_classes, width_divisor), report


def _unflatten(flat: dict[str, np.ndarray], num_classes: int, width_divisor: int):
    """'/'-joined names -> the variable tree (mixed-block unit names hold a '/' themselves,
    so the paths come from the template, not from splitting)."""
    paths = {"/".join(k): k for k in i3d.template(num_classes, width_divisor)}
    return flax.traverse_util.unflatten_dict(
        {
            paths[k]: v.reshape(i3d.template(num_classes, width_divisor)[paths[k]])
            for k, v in flat.items()
        }
    )


def import_weights(
    src, out, *, layout: str = "auto", bn_eps: float | None = None
) -> tuple[pathlib.Path, LoadReport]:
    """Converts the checkpoint `src` into the `.npz` `out` that `evaluate.fvd_weights`
    names, and writes the load report beside it (`OUT.load_report.txt`). Raises naming
    the file and every unmatched tensor when the checkpoint is not a full I3D."""
    if not str(out).endswith(".npz"):
        raise ValueError(f"--i3d_out={out!r}: name the converted weights file *.npz")
    tensors = read_tensors(src)
    variables, report = convert(tensors, layout=layout, bn_eps=bn_eps, source=str(src))
    if variables is None:
        raise ValueError(
            f"{report}\nI3D checkpoint {src} does not match the Kinetics I3D network: check "
            "that it is an RGB I3D (not flow, not a ResNet-3D), pass --i3d_layout if the "
            "names were detected wrongly, and that no tensor was renamed"
        )
    out = pathlib.Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    i3d.save_weights(out, variables)
    out.with_suffix(".load_report.txt").write_text(str(report) + "\n")
    return out, report
