"""Retraining a model keeps earlier streams decodable: replaced weights move to the archive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compass_serve import Client
from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec, ModelMismatch
from compass_serve.codec.registry import (
    ARCHIVE,
    PRESETS,
    ModelNotFound,
    build,
    list_models,
    model_info,
    read_state,
    save_model,
    sha256_file,
)
from tests.conftest import make_tiny, photo
from tests.server_harness import LiveServer, png_bytes, test_settings


def test_retrain_archives_the_replaced_weights(tmp_path: Path) -> None:
    make_tiny(tmp_path, "tiny", seed=0)
    old = Codec.load("tiny", tmp_path)
    stream = old.encode(photo(64, 40), widths=[16, 32, 64])
    expected = np.asarray(old.decode(stream, width=50).image)

    make_tiny(tmp_path, "tiny", seed=3)  # "retrained": same name, new weights
    new = Codec.load("tiny", tmp_path)
    assert new.weights_id != old.weights_id
    assert [m.name for m in list_models(tmp_path)] == ["tiny"]  # one current version
    versions = {m.weights_id for m in list_models(tmp_path, archived=True)}
    assert versions == {old.weights_id, new.weights_id}
    with pytest.raises(ModelMismatch):
        new.decode(stream)

    # The stream names its weights; the archive still has them, verified by sha256 on load.
    again = Codec.for_stream(stream, tmp_path)
    assert again.weights_id == old.weights_id
    assert np.array_equal(np.asarray(again.decode(stream, width=50).image), expected)
    assert model_info("tiny", tmp_path, old.weights_id).manifest["archived"] is True

    # Re-saving the same weights is byte-reproducible (update() recomputes the CDF tables the
    # same way every time, whatever the thread count), so it archives nothing.
    model = build(PRESETS["tiny"], read_state(model_info("tiny", tmp_path)))
    first = save_model(model, "tiny", "tiny", tmp_path)
    before = {p.name for p in (tmp_path / ARCHIVE).glob("*.safetensors")}
    threads = torch.get_num_threads()
    shas = set()
    try:
        for i in range(6):  # safetensors once wrote its metadata in a random order per call
            torch.set_num_threads(1 + i % 2)
            shas.add(save_model(model, "tiny", "tiny", tmp_path).sha256)
    finally:
        torch.set_num_threads(threads)
    added = {p.name for p in (tmp_path / ARCHIVE).glob("*.safetensors")} - before
    assert shas == {first.sha256}
    assert added == set()
    with pytest.raises(ModelNotFound, match="versions here"):
        Codec.load("tiny", tmp_path, weights_id=bytes(8))


def test_server_and_sdk_decode_images_stored_before_a_retrain(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_tiny(store, "tiny", seed=0)
    settings = test_settings(tmp_path / "data", store)
    with LiveServer(settings) as srv, srv.client() as c:
        r = c.post("/images", content=png_bytes(photo(80, 50)), params={"wait": "true",
                                                                        "widths": "20,40,80"})
        assert r.status_code == 201
        old_id, old_weights = r.json()["id"], r.json()["weights_id"]
        before = c.get(f"/images/{old_id}", params={"width": 60, "format": "png"}).content

    make_tiny(store, "tiny", seed=9)  # the operator ships retrained weights and restarts
    with LiveServer(settings) as srv, srv.client() as c:
        r = c.get(f"/images/{old_id}", params={"width": 60, "format": "png"})
        assert r.status_code == 200 and r.content == before
        fresh = c.post("/images", content=png_bytes(photo(80, 50, seed=1)),
                       params={"wait": "true"}).json()
        assert fresh["weights_id"] != old_weights  # new uploads use the new weights
        with Client(srv.url, model_store=store) as sdk:
            assert sdk.fetch(old_id, 60).size == (60, 38)

        # Without the archived version the answer is a clear 409, not a crash.
        shutil.rmtree(store / ARCHIVE)
        r = c.get(f"/images/{old_id}", params={"width": 70, "format": "png"})
        assert r.status_code == 409 and r.json()["code"] == "model_mismatch"
        assert old_weights in r.json()["detail"]


def test_stream_header_names_the_weights(tmp_path: Path) -> None:
    make_tiny(tmp_path, "tiny", seed=0)
    codec = Codec.load("tiny", tmp_path)
    header = bs.parse_header(codec.encode(photo(32, 24)))
    assert (header.model, header.weights_id) == ("tiny", codec.weights_id)


def test_shipped_weights_store_large_tensors_as_float16_and_code_as_the_saved_model(
    tmp_path: Path,
) -> None:
    torch.manual_seed(5)
    model = build(PRESETS["tiny"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = save_model(model, "tiny", "tiny", tmp_path)
    stored = read_state(info)
    dtypes = {k: v.dtype for k, v in stored.items()}
    conv = "enhancement.residual.g_a.stages.1.conv.weight"  # 16 x 16 x 5 x 5
    assert dtypes[conv] == torch.float16
    assert dtypes["enhancement.residual.log_gain"] == torch.float32  # small: exact
    assert dtypes["base.codec.gaussian_conditional._quantized_cdf"] == torch.int32
    # The saved model now holds the stored values (within float16's rounding of the old ones).
    assert torch.equal(model.state_dict()[conv], stored[conv].float())
    assert torch.allclose(before[conv], stored[conv].float(), rtol=1e-3, atol=1e-6)
    img = photo(64, 40)
    saved = Codec(model, "tiny", info.weights_id)
    assert Codec.load("tiny", tmp_path).encode(img, widths=[16, 64]) == saved.encode(
        img, widths=[16, 64])


def test_weights_split_into_a_decoder_file_and_an_encoder_file(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build(PRESETS["tiny"])
    info = save_model(model, "tiny", "tiny", tmp_path)
    assert info.encoder_path == tmp_path / "tiny.encoder.safetensors"
    decoder, encoder = load_file(str(info.path)), load_file(str(info.encoder_path))
    assert set(decoder) | set(encoder) == set(model.state_dict())
    assert all(".g_a." in k or ".h_a." in k for k in encoder)
    assert not any(".g_a." in k or ".h_a." in k for k in decoder)
    assert {k.split(".g_a.")[0] for k in encoder if ".g_a." in k} == {"base.codec",
                                                                       "enhancement.residual"}
    assert info.encoder_sha256 == sha256_file(info.encoder_path)
    assert info.weights_id == bytes.fromhex(sha256_file(info.path))[:8]

    # A retrained encoder alone keeps the decoder, so the identity and every stream stay valid:
    # nothing is archived, the encoder file is replaced.
    img = photo(48, 32)
    stream = Codec.load("tiny", tmp_path).encode(img, widths=[12, 24, 48])
    with torch.no_grad():
        model.base.codec.g_a.stages[-1].conv.weight.mul_(8.0)
    again = save_model(model, "tiny", "tiny", tmp_path)
    assert again.weights_id == info.weights_id and again.encoder_sha256 != info.encoder_sha256
    assert not (tmp_path / ARCHIVE).exists()
    codec = Codec.load("tiny", tmp_path)
    assert codec.encode(img, widths=[12, 24, 48]) != stream  # the new encoder codes
    assert codec.decode(stream).image.size == (48, 32)  # and the old stream still decodes

    # A new decoder archives both files under the old identity; both are verified on load.
    with torch.no_grad():
        model.enhancement.residual.g_s.stages[0].conv.weight.mul_(0.9)
    save_model(model, "tiny", "tiny", tmp_path)
    old = model_info("tiny", tmp_path, info.weights_id)
    stem = f"tiny-{info.sha256[:16]}"
    assert [p.name for p, _ in old.files] == [f"{stem}.safetensors", f"{stem}.encoder.safetensors"]
    assert np.array_equal(np.asarray(Codec.for_stream(stream, tmp_path).decode(stream).image),
                          np.asarray(codec.decode(stream).image))

    # A damaged or missing file is a clear error, never a half-loaded model.
    enc = tmp_path / "tiny.encoder.safetensors"
    data = bytearray(enc.read_bytes())
    data[-1] ^= 1
    enc.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tiny\.encoder\.safetensors: sha256"):
        read_state(model_info("tiny", tmp_path))
    enc.unlink()
    with pytest.raises(ModelNotFound, match=r"tiny\.encoder\.safetensors .* is missing"):
        read_state(model_info("tiny", tmp_path))


def test_versions_saved_as_one_file_still_load(tmp_path: Path) -> None:
    """Weights exported before the split (one file, no encoder entry) load unchanged."""
    torch.manual_seed(4)
    model = build(PRESETS["tiny"])
    save_model(model, "tiny", "tiny", tmp_path)
    man = json.loads((tmp_path / "tiny.json").read_text())
    whole = tmp_path / "whole.safetensors"
    save_file(read_state(model_info("tiny", tmp_path)), str(whole))
    man["weights"] = {"file": whole.name, "sha256": sha256_file(whole)}
    (tmp_path / "tiny.json").write_text(json.dumps(man))
    legacy = model_info("tiny", tmp_path)
    assert legacy.encoder_path is None and legacy.files == ((whole, legacy.sha256),)
    img = photo(48, 32)
    stream = Codec(model, "tiny", legacy.weights_id).encode(img, widths=[24, 48])
    assert Codec.load("tiny", tmp_path).encode(img, widths=[24, 48]) == stream
