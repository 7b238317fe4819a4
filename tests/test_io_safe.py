"""ember.io.safe: no file ember loads can run code (crafted DCP metadata, bytes items, .pt files)."""

import io
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ember.errors import EmberError
from ember.io import safe
from ember.models import Transformer, preset
from ember.train import state
from ember.train.optim import build_optimizer


class _Boom:
    """Pickles to os.system('touch MARKER'): what an attacker would put in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _saved_run(tmp_path):
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    opt = build_optimizer(model, 1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    path = state.save_train_state(tmp_path / "run", 1, model, opt, model_config=model.cfg.to_dict())
    return model, opt, path


def test_crafted_metadata_is_refused_on_resume_and_export(tmp_path):
    model, opt, ckpt = _saved_run(tmp_path)
    marker = tmp_path / "PWNED"
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(safe.UnsafeFileError, match=r"\.metadata: refused to load: it names posix\.system"):
        state.load_train_state(ckpt, model, opt)
    with pytest.raises(safe.UnsafeFileError, match="refused"):
        state.export_to_safetensors(ckpt, tmp_path / "out")
    assert not marker.exists()
    # the same file through torch's own reader runs the payload: the hole this closes
    with pytest.raises(BaseException):  # DCP's CheckpointException is a BaseException
        dcp.load({"model": model.state_dict()}, checkpoint_id=str(ckpt / "dcp"))
    assert marker.exists()


def test_crafted_bytes_item_is_refused(tmp_path):
    model, opt, ckpt = _saved_run(tmp_path)
    marker = tmp_path / "PWNED2"
    md = safe.load_dcp_metadata(ckpt / "dcp" / ".metadata")
    key = next(k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata")
    info = md.storage_data[next(i for i in md.storage_data if i.fqn == key)]
    payload = io.BytesIO()
    torch.save(_Boom(marker), payload)
    data = payload.getvalue()
    path = ckpt / "dcp" / info.relative_path
    blob = bytearray(path.read_bytes())
    blob[info.offset:info.offset + info.length] = b""  # splice the payload in place of the item
    blob[info.offset:info.offset] = data
    shift = len(data) - info.length
    path.write_bytes(bytes(blob))
    for idx, si in md.storage_data.items():
        if si.relative_path == info.relative_path and si.offset > info.offset:
            si.offset += shift
    info.length = len(data)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(safe.UnsafeFileError, match="refused"):
        state.load_train_state(ckpt, model, opt)
    assert not marker.exists()


def test_genuine_checkpoint_still_loads(tmp_path):
    model, opt, ckpt = _saved_run(tmp_path)
    model2 = Transformer(preset("tiny"))
    opt2 = build_optimizer(model2, 5e-1)
    state.load_train_state(ckpt, model2, opt2)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_pt_file_refused_in_one_line(tmp_path):
    marker = tmp_path / "PWNED3"
    path = tmp_path / "evil.pt"
    torch.save(_Boom(marker), path)
    with pytest.raises(EmberError) as e:
        safe.load_pt(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "not a plain tensor" in msg
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EmberError, match="junk.pt"):
        safe.load_pt(tmp_path / "junk.pt")
