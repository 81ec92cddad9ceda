"""The VAE tokenizer artifact and the `vae` tokenizer (sora_jax.models.tokenizer).

An artifact is a directory `weights.msgpack, config.json, norm.json, hash`: the parameters,
the architecture (sora_jax.models.vae.VAEConfig), the per-channel latent normalization
measured on data, and a sha256 over the three files, which travels into shard manifests.
`tokenize` and `sample` load it by `tokenizer.path`. `export_tokenizer` writes one from a
parameter tree in memory, `export_tokenizer_streamed` one tensor at a time (imports of
published weights, sora_jax.models.wan_vae_import): the same files, loaded the same way.

Without a path, `tokenizer.preset` gives a tokenizer of the preset's geometry only (latent
shapes and manifest fields, no weights): enough to validate and `--mode=plan` a config
before its VAE exists; encoding or decoding with it is an error that says so.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import linen as nn

from sora_jax.models.vae import PRESETS, LatentNorm, VAEConfig, decode, encode, encode_moments


def measure_norm(config: VAEConfig, params, batches) -> LatentNorm:
    """Per-channel mean and std of the encoder means over `batches` of clips
    `[B, T, H, W, 3]`, accumulated in float64; std is floored at 1e-6 (a dead channel)."""
    count, total, sq = 0, 0.0, 0.0
    for video in batches:
        mean, _ = encode_moments(config, params, jnp.asarray(video, jnp.float32))
        m = np.asarray(mean, np.float64).reshape(-1, config.z_dim)  # [B·T'·H'·W', C]
        count, total, sq = count + m.shape[0], total + m.sum(0), sq + np.square(m).sum(0)
    if count == 0:
        raise ValueError("measure_norm got no clips: pass at least one batch")
    mu = total / count
    std = np.sqrt(np.maximum(sq / count - mu**2, 0.0))
    return LatentNorm(jnp.asarray(mu, jnp.float32), jnp.asarray(np.maximum(std, 1e-6), jnp.float32))


# --- The tokenizer artifact -------------------------------------------------------------

ARTIFACT_FILES = ("weights.msgpack", "config.json", "norm.json")  # hashed in this order


def _digest(blobs: list[bytes]) -> str:
    """sha256 over the files' own sha256s (unambiguous where their bytes meet)."""
    return _digest_of([hashlib.sha256(b).hexdigest() for b in blobs])


def _digest_of(file_hashes: list[str]) -> str:
    lines = "".join(f"{n}:{h}\n" for n, h in zip(ARTIFACT_FILES, file_hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def _metadata_blobs(config: VAEConfig, norm: LatentNorm, name: str, info) -> list[bytes]:
    """config.json and norm.json."""
    meta = {"format": 1, "name": name, "architecture": config.to_dict(), "info": info or {}}
    norm_dict = {k: np.asarray(v, np.float32).tolist() for k, v in norm._asdict().items()}
    return [
        json.dumps(meta, indent=2, sort_keys=True).encode(),
        json.dumps(norm_dict, indent=2).encode(),
    ]


def export_tokenizer(
    path, params, config: VAEConfig, norm: LatentNorm, *, name: str = "vae", info=None
) -> str:
    """Writes the artifact directory `path/{weights.msgpack, config.json, norm.json, hash}`;
    returns the hash. `info` (JSON-able: data, steps, PSNR) is recorded in config.json."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = flax.serialization.msgpack_serialize(
        jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(nn.meta.unbox(params)))
    )
    blobs = [weights, *_metadata_blobs(config, norm, name, info)]
    for file, blob in zip(ARTIFACT_FILES, blobs):
        (path / file).write_bytes(blob)
    digest = _digest(blobs)
    (path / "hash").write_text(digest + "\n")  # last: a complete artifact has a hash file
    return digest


def export_tokenizer_streamed(
    path,
    structure: Mapping,
    read: Callable[[tuple[str, ...]], np.ndarray],
    config: VAEConfig,
    norm: LatentNorm,
    *,
    name: str = "vae",
    info=None,
) -> str:
    """`export_tokenizer` holding one tensor in memory at a time; returns the hash.

    `structure` is the parameter tree (nested dicts; leaves anything, e.g. the
    `jax.ShapeDtypeStruct`s of `jax.eval_shape`), `read(path)` gives the leaf at the key path
    as an array, called once per leaf in tree order. weights.msgpack is written as msgpack
    allows, map header by header and leaf by leaf (each leaf exactly as
    `flax.serialization.msgpack_serialize` packs it), and hashed as it is written.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "hash").unlink(missing_ok=True)  # an interrupted export leaves no valid artifact
    sha = hashlib.sha256()
    with open(path / ARTIFACT_FILES[0], "wb") as fh:

        def write(blob: bytes) -> None:
            fh.write(blob)
            sha.update(blob)

        def tree(node: Mapping, prefix: tuple[str, ...]) -> None:
            write(msgpack.Packer().pack_map_header(len(node)))
            for key, child in node.items():
                write(msgpack.packb(str(key)))
                if isinstance(child, Mapping):
                    tree(child, (*prefix, str(key)))
                else:
                    leaf = np.asarray(read((*prefix, str(key))), np.float32)
                    write(flax.serialization.msgpack_serialize(leaf))

        tree(structure, ())
    blobs = _metadata_blobs(config, norm, name, info)
    for file, blob in zip(ARTIFACT_FILES[1:], blobs):
        (path / file).write_bytes(blob)
    digest = _digest_of([sha.hexdigest(), *(hashlib.sha256(b).hexdigest() for b in blobs)])
    (path / "hash").write_text(digest + "\n")  # last: a complete artifact has a hash file
    return digest


def load_artifact(path) -> tuple[VAEConfig, Any, LatentNorm, str, dict]:
    """`(config, params, norm, hash, meta)` of an artifact; checks the recorded hash."""
    path = pathlib.Path(path)
    missing = [f for f in (*ARTIFACT_FILES, "hash") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer artifact {path} lacks {missing}: point tokenizer.path at a directory "
            "written by vae_artifact.export_tokenizer (e.g. WORKDIR/tokenizer of a VAE run)"
        )
    blobs = [(path / f).read_bytes() for f in ARTIFACT_FILES]
    digest, recorded = _digest(blobs), (path / "hash").read_text().strip()
    if digest != recorded:
        raise ValueError(
            f"{path}/hash is {recorded[:16]}... but the files hash to {digest[:16]}...: the "
            "artifact was modified after export; re-export it"
        )
    meta = json.loads(blobs[1])
    config = VAEConfig.from_dict(meta["architecture"])
    params = jax.device_put(flax.serialization.msgpack_restore(blobs[0]))
    stats = json.loads(blobs[2])
    norm = LatentNorm(*(jnp.asarray(stats[k], jnp.float32) for k in LatentNorm._fields))
    return config, params, norm, digest, meta


class VAETokenizer:
    """The `vae` tokenizer (sora_jax.models.tokenizer): a causal VAE artifact.

    encode: video `[B, T, H, W, 3]` in [-1, 1] -> normalized latents `[B, T', H', W', C]`;
    decode: the inverse map to [-1, 1], in `decode_chunk_frames` latent frames and
    `decode_tile` latent tiles at a time when > 0 (same result, bounded memory).
    """

    def __init__(
        self, path, *, decode_chunk_frames: int = 0, decode_tile: int = 0, preset: str = ""
    ):
        self.decode_chunk_frames, self.decode_tile = int(decode_chunk_frames), int(decode_tile)
        if path:
            self.path = pathlib.Path(path)
            self.config, self.params, self.norm, self.hash, meta = load_artifact(self.path)
            self.id = f"causal_vae-{meta['name']}"
        else:  # geometry only (module docstring)
            if preset not in PRESETS:
                raise ValueError(
                    f"tokenizer.path is empty and tokenizer.preset={preset!r} is not one of "
                    f"{list(PRESETS)}: set tokenizer.path to a VAE artifact directory (written "
                    "by export_tokenizer; a VAE training run writes WORKDIR/tokenizer)"
                )
            self.path, self.params = None, None
            self.config = PRESETS[preset]
            self.norm = LatentNorm.identity(self.config.z_dim)
            self.hash = f"unweighted-{preset}"
            self.id = f"causal_vae-{preset}-unweighted"
        self.latent_channels = self.config.z_dim

    @classmethod
    def from_config(cls, cfg) -> VAETokenizer:
        """From the `tokenizer` config: `path` (or `preset` for geometry only), optional
        `decode_chunk_frames`, `decode_tile`."""
        return cls(
            cfg.get("path", ""),
            decode_chunk_frames=cfg.get("decode_chunk_frames", 0),
            decode_tile=cfg.get("decode_tile", 0),
            preset=cfg.get("preset", ""),
        )

    def _weights(self) -> None:
        if self.params is None:
            raise ValueError(
                f"tokenizer {self.id} has no weights (tokenizer.path is empty): it can plan "
                "shapes but not encode or decode; set tokenizer.path to a VAE artifact"
            )

    def check_frames(self, frames: int) -> None:
        r = self.config.temporal
        if frames >= 1 and (frames - 1) % r == 0:
            return
        lo = 1 + r * max((frames - 1) // r, 0)
        nearest = f"{lo} or {lo + r}" if frames > 1 else f"{lo}"
        raise ValueError(
            f"frames={frames} is not of the form 1 + {r}k that tokenizer {self.id} (temporal "
            f"compression {r}) needs; the nearest valid frame counts are {nearest}"
        )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_frames(frames)
        s = self.config.spatial
        if height % s or width % s:
            raise ValueError(
                f"pixel size height={height} x width={width} is not divisible by the spatial "
                f"compression {s} of tokenizer {self.id}; use multiples of {s}"
            )
        return (
            1 + (frames - 1) // self.config.temporal,
            height // s,
            width // s,
            self.config.z_dim,
        )

    def encode(self, video):
        self._weights()
        b, t, h, w, _ = video.shape
        self.latent_shape(t, h, w)
        return encode(self.config, self.params, self.norm, jnp.asarray(video, jnp.float32))

    def decode(self, latents):
        self._weights()
        return decode(
            self.config,
            self.params,
            self.norm,
            jnp.asarray(latents, jnp.float32),
            chunk_frames=self.decode_chunk_frames,
            tile=self.decode_tile,
        )

    def manifest_entry(self) -> dict:
        r, s = self.config.temporal, self.config.spatial
        return {
            "id": self.id,
            "hash": self.hash,
            "latent_channels": self.latent_channels,
            "compression": [r, s, s],
            "normalization": {k: np.asarray(v).tolist() for k, v in self.norm._asdict().items()},
        }


def load_tokenizer(path, **kwargs) -> VAETokenizer:
    """The `VAETokenizer` of an artifact directory written by `export_tokenizer`."""
    return VAETokenizer(path, **kwargs)
