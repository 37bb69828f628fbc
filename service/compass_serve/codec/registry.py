"""Model registry: the one place that knows presets, weight files and manifests.

`model_store/<name>.safetensors` holds the weights a decoder needs and
`model_store/<name>.encoder.safetensors` the analysis transforms only an encoder runs (g_a, h_a;
safetensors: no pickle), and `model_store/<name>.json` the manifest: preset, config, qualities,
training record, data, sha256 of both files and the evaluation figures they produced. The split
keeps each file under 16 MiB while the encoder grows (its capacity costs encode time only), and
the decoder file alone is the weights' identity: a stream needs nothing else.

Streams name the exact weights that coded them (the first 8 bytes of the sha256), so weights
that are replaced are not deleted: `save_model` moves them to `model_store/archive/` as
`<name>-<sha256[:16]>.*`, and `load_model(name, weights_id=...)` finds them there. Images
stored by an earlier release therefore stay decodable after the weights are retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compass_serve.codec.backbone import BackboneConfig
from compass_serve.codec.liff import LiffConfig
from compass_serve.codec.model import WIDE_LAMBDAS, Compass, CompassConfig
from compass_serve.codec.postfilter import PostFilterConfig

# Sized for serving on a 2-core CPU: ~1.8 M parameters per transform codec, a light LIFF.
_LITE = CompassConfig(
    base=BackboneConfig(n=64, m=96),
    residual=BackboneConfig(n=64, m=96),
    liff=LiffConfig(features=32, blocks=2, convs=3, growth=16, hidden=64, depth=3, skip="bicubic"),
)

PRESETS: dict[str, CompassConfig] = {
    "lite": _LITE,
    # lite on the wide rate ladder (8 levels, for about 0.1-1 bpp); `train --init-from lite` starts
    # it from the four-level weights with their gains regridded (`regrid_gains`).
    "lite-wide": _LITE.with_lambdas(WIDE_LAMBDAS),
    # lite-wide with twice the residual codec's latent channels (the top layer's bits are most of
    # a stream's); `train --init-from` widens lite-wide weights to it (`widen_latent`).
    "lite-wide-rc192": replace(
        _LITE, residual=replace(_LITE.residual, m=192)).with_lambdas(WIDE_LAMBDAS),
    # lite-wide-rc192 with a residual analysis transform twice as wide: encoder capacity costs
    # encode time only; `train --init-from` widens lite-wide-rc192 weights to it
    # (`widen_transforms`).
    "lite-wide-rc192-ga128": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=128)).with_lambdas(WIDE_LAMBDAS),
    # Once more (session 15): the encoder file (two files since session 14) has the room, and the
    # held-rate validations of ga128's third cycle fell half as fast as its second's.
    "lite-wide-rc192-ga192": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=192)).with_lambdas(WIDE_LAMBDAS),
    # ga192 with the residual synthesis 1.5x as wide: decoder capacity, where the top level
    # flattens; it runs at every decode (`benchmarks/decode_breakdown.py --widen-synthesis 96`:
    # about 1.85x the RC synthesis time, ~0.1 s of a Kodak decode).
    "lite-wide-rc192-ga192-gs96": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=192, n_synthesis=96),
    ).with_lambdas(WIDE_LAMBDAS),
    # gs96 with the synthesis widened once more (session 19): its second cycle's held-rate
    # validations no longer fell, and `decode_breakdown.py --widen-synthesis 128` prices it at
    # about 0.1 s more a Kodak decode, inside the 1.0 s target.
    "lite-wide-rc192-ga192-gs128": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=192, n_synthesis=128),
    ).with_lambdas(WIDE_LAMBDAS),
    # gs128 with the residual analysis transform at 256 (session 26): `decode_breakdown.py
    # --widen-synthesis 192` priced a wider synthesis at ~0.25 s more a Kodak decode, too close to
    # the 1.0 s target, while encoder capacity costs encode time only.
    "lite-wide-rc192-ga256-gs128": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=256, n_synthesis=128),
    ).with_lambdas(WIDE_LAMBDAS),
    # gs128 with a post-filter on each enhancement layer's decoded image (session 30): three 3x3
    # convolutions of 32 channels on the layer, its LIFF prediction and the quality
    # (`codec.postfilter`); `train --stage filter --init-from lite` trains it alone.
    "lite-wide-rc192-ga192-gs128-pf32": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=192, n_synthesis=128),
        post_filter=PostFilterConfig(channels=32, layers=3),
    ).with_lambdas(WIDE_LAMBDAS),
    # pf32 with five convolutions (session 31): an 11-pixel receptive field for 0.06 s more a Kodak
    # display decode; `train --stage filter --init-from lite` starts it as the shipped filter
    # (`deepen`).
    "lite-wide-rc192-ga192-gs128-pf32x5": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=192, n_synthesis=128),
        post_filter=PostFilterConfig(channels=32, layers=5),
    ).with_lambdas(WIDE_LAMBDAS),
    # pf32x5 with the filter in the loop (session 32): the next layer's LIFF reads the filtered
    # layer. The shipped filter put in the loop unchanged saved 1.2 % of the top layer's bits on 6
    # Kodak images; a display decode then filters every enhancement layer (+0.035 s on Kodak).
    "lite-wide-rc192-ga192-gs128-pf32x5-il": replace(
        _LITE, residual=replace(_LITE.residual, m=192, n_analysis=192, n_synthesis=128),
        post_filter=PostFilterConfig(channels=32, layers=5, in_loop=True),
    ).with_lambdas(WIDE_LAMBDAS),
    # The paper's sizes: mbt2018-mean N=128, M=192; RDN 64 ch, 4x4 convs, growth 32; MLP 4x256.
    "paper": CompassConfig(
        base=BackboneConfig(n=128, m=192),
        residual=BackboneConfig(n=128, m=192),
        liff=LiffConfig(features=64, blocks=4, convs=4, growth=32, hidden=256, depth=4,
                        chunk_pixels=16384),
    ),
    # Random-weight unit tests only: same structure, a few thousand parameters.
    "tiny": CompassConfig(
        base=BackboneConfig(n=16, m=24),
        residual=BackboneConfig(n=16, m=24),
        liff=LiffConfig(features=8, blocks=1, convs=2, growth=8, hidden=16, depth=2),
        post_filter=PostFilterConfig(channels=4, layers=2),
    ),
}


def preset_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a preset's parts (the README's presets table comes from these): the
    base layer's codec (IC), the residual codec (RC) with its analysis and synthesis transforms,
    LIFF and the post-filter. The RC's analysis runs only at encode time, its synthesis at every
    decode."""
    model = Compass(PRESETS[name])
    rc = model.enhancement.residual

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    pf = model.enhancement.post_filter
    return {"ic": count(model.base.codec), "rc": count(rc), "rc_analysis": count(rc.g_a),
            "rc_synthesis": count(rc.g_s), "liff": count(model.enhancement.liff),
            "post_filter": count(pf) if pf is not None else 0}


def default_store() -> Path:
    """`COMPASS_MODEL_STORE`, else the repository's `model_store/` next to `service/`."""
    env = os.environ.get("COMPASS_MODEL_STORE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "model_store"


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    preset: str
    qualities: int
    sha256: str
    path: Path
    manifest: dict
    # The analysis transforms' file; None for versions saved as one file (before session 14).
    encoder_sha256: str | None = None
    encoder_path: Path | None = None

    @property
    def weights_id(self) -> bytes:
        """8 bytes that the bitstream carries to pair a stream with these exact weights."""
        return bytes.fromhex(self.sha256)[:8]

    @property
    def files(self) -> tuple[tuple[Path, str], ...]:
        """Every weights file with its sha256, decoder first."""
        if self.encoder_path is None or self.encoder_sha256 is None:
            return ((self.path, self.sha256),)
        return (self.path, self.sha256), (self.encoder_path, self.encoder_sha256)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ARCHIVE = "archive"


def _infos(folder: Path) -> list[ModelInfo]:
    out = []
    for man in sorted(folder.glob("*.json")):
        d = json.loads(man.read_text())
        if "weights" not in d:
            continue
        w, enc = d["weights"], d["weights"].get("encoder")
        out.append(ModelInfo(
            name=d["name"], preset=d["preset"], qualities=len(d["config"]["lambdas"]),
            sha256=w["sha256"], path=folder / w["file"], manifest=d,
            encoder_sha256=enc["sha256"] if enc else None,
            encoder_path=folder / enc["file"] if enc else None,
        ))
    return out


def list_models(store: Path | None = None, archived: bool = False) -> list[ModelInfo]:
    """The current weights of every model; with `archived`, also the versions they replaced."""
    store = store or default_store()
    return _infos(store) + (_infos(store / ARCHIVE) if archived else [])


def model_info(name: str, store: Path | None = None, weights_id: bytes | None = None) -> ModelInfo:
    """A model's current weights, or with `weights_id` the version (current or archived) that
    a stream names."""
    for info in list_models(store, archived=weights_id is not None):
        if info.name == name and (weights_id is None or info.weights_id == weights_id):
            return info
    if weights_id is not None:
        known = ", ".join(i.weights_id.hex() for i in list_models(store, True) if i.name == name)
        raise ModelNotFound(f"model {name!r} with weights {weights_id.hex()} is not in the model "
                            f"store (versions here: {known or 'none'})")
    names = ", ".join(i.name for i in list_models(store)) or "none"
    raise ModelNotFound(f"model {name!r} is not in the model store (available: {names})")


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


# Shipped weights store large float tensors (convolutions, LIFF's layers) as float16: half the
# bytes, so a model with twice the residual latent still fits a 16 MiB file; the eval measures the
# file as stored. Small tensors (gains, GDN, the entropy models' quantiles and scale table) stay
# float32 and the CDF tables integer; loading casts back to float32.
HALF_MIN_NUMEL = 1024


def shipped_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.dtype == torch.float32 and v.numel() >= HALF_MIN_NUMEL else v
            for k, v in state_dict_for_save(model).items()}


ENCODER_MODULES = frozenset({"g_a", "h_a"})  # the analysis transforms: run by encoders only
ENCODER_SUFFIX = ".encoder"  # <name>.encoder.safetensors


def split_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoder, encoder) halves of a state dict: the encoder half is every analysis transform's
    tensors, the decoder half everything else (synthesis, hyper-synthesis, entropy models, LIFF)."""
    decoder, encoder = {}, {}
    for key, value in state.items():
        (encoder if ENCODER_MODULES & set(key.split(".")) else decoder)[key] = value
    return decoder, encoder


def read_state(info: ModelInfo) -> dict[str, torch.Tensor]:
    """All weights of a model version, every file verified against its manifest's sha256."""
    return _read_files(info.name, info.files)


def _read_files(name: str, files: tuple[tuple[Path, str], ...]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path, sha256 in files:
        if not path.exists():
            raise ModelNotFound(f"{path.name} (weights of model {name!r}) is missing from the "
                                f"model store")
        actual = sha256_file(path)
        if actual != sha256:
            raise ValueError(f"{path.name}: sha256 {actual[:12]}... does not match the manifest")
        state |= load_file(str(path))
    return state


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights, resizing the entropy models' CDF buffers (empty until `update()`)."""
    own = dict(model.named_buffers())
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            mod_name, _, buf = key.rpartition(".")
            model.get_submodule(mod_name).register_buffer(buf, torch.empty_like(value))
    model.load_state_dict(state)


def build(config: CompassConfig | dict, state: dict[str, torch.Tensor] | None = None) -> Compass:
    cfg = config if isinstance(config, CompassConfig) else CompassConfig.from_dict(config)
    model = Compass(cfg)
    if state is not None:
        load_state(model, state)
    return model.eval()


@lru_cache(maxsize=4)
def _load_cached(name: str, files: tuple[tuple[Path, str], ...], config_json: str) -> Compass:
    model = build(json.loads(config_json), _read_files(name, files))
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_model(
    name: str, store: Path | None = None, weights_id: bytes | None = None
) -> tuple[Compass, ModelInfo]:
    """Load a shipped model by name, optionally an exact (possibly archived) version (cached per
    process; weights verified against the manifest)."""
    info = model_info(name, store, weights_id)
    model = _load_cached(info.name, info.files, json.dumps(info.manifest["config"]))
    return model, info


def save_model(
    model: Compass, name: str, preset: str, store: Path | None = None, **manifest: object
) -> ModelInfo:
    """Write `<name>.safetensors` and `<name>.encoder.safetensors` (CDF tables refreshed,
    `shipped_state`, split by `split_state`) and the manifest into a model store; `model` is left
    holding exactly the weights written. Replaced decoder weights move to the archive."""
    store = store or default_store()
    store.mkdir(parents=True, exist_ok=True)
    model.update()
    state = shipped_state(model)
    load_state(model, state)
    # One metadata key: safetensors writes its metadata map in a per-process random order, so
    # two keys gave the same weights two different files (and weights ids) at random.
    meta = {"compass": json.dumps({"name": name, "preset": preset}, sort_keys=True)}
    tmps = []
    for suffix, part in zip(("", ENCODER_SUFFIX), split_state(state), strict=True):
        tmp = store / f"{name}{suffix}.tmp"
        save_file(part, str(tmp), metadata=meta)
        tmps.append((tmp, store / f"{name}{suffix}.safetensors"))
    # Same decoder, same identity: streams coded before stay valid, so only a new decoder
    # archives the current version (a retrained encoder alone just replaces its file).
    if sha256_file(tmps[0][0]) != _current_sha(name, store):
        archive_model(name, store)
    entries = []
    for tmp, final in tmps:
        tmp.replace(final)
        final.chmod(0o644)  # safetensors writes 0600; servers and workers may run as other users
        entries.append({"file": final.name, "sha256": sha256_file(final),
                        "bytes": final.stat().st_size})
    doc = {
        "name": name,
        "preset": preset,
        "config": model.cfg.to_dict(),
        "weights": entries[0] | {"encoder": entries[1]},
        **manifest,
    }
    (store / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    _load_cached.cache_clear()
    return model_info(name, store)


def _current_sha(name: str, store: Path) -> str | None:
    try:
        return model_info(name, store).sha256
    except ModelNotFound:
        return None


def archive_model(name: str, store: Path | None = None) -> ModelInfo | None:
    """Move a model's current weights and manifest to `archive/` (no-op when it has none)."""
    store = store or default_store()
    try:
        info = model_info(name, store)
    except ModelNotFound:
        return None
    folder = store / ARCHIVE
    folder.mkdir(exist_ok=True)
    stem = f"{name}-{info.sha256[:16]}"
    weights = info.manifest["weights"] | {"file": f"{stem}.safetensors"}
    info.path.replace(folder / weights["file"])
    if info.encoder_path is not None:
        weights["encoder"] = weights["encoder"] | {"file": f"{stem}{ENCODER_SUFFIX}.safetensors"}
        info.encoder_path.replace(folder / weights["encoder"]["file"])
    doc = info.manifest | {"weights": weights, "archived": True}
    (folder / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (store / f"{name}.json").unlink()
    _load_cached.cache_clear()
    return model_info(name, store, info.weights_id)


def update_manifest(name: str, fields: dict, store: Path | None = None) -> None:
    """Merge `fields` into a model's manifest (e.g. evaluation figures)."""
    info = model_info(name, store)
    man = (store or default_store()) / f"{name}.json"
    man.write_text(json.dumps(info.manifest | fields, indent=2) + "\n")
