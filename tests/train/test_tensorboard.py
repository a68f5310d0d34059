"""TensorBoard event files, decoded by the protobuf library from the schema TensorBoard uses."""

import pytest

from tensorboard_events import read_events
from transformax.train import tensorboard


def test_crc32c_known_values():
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert tensorboard.crc32c(b"") == 0


def test_events_decode(tmp_path):
    writer = tensorboard.EventWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # nothing until the first record
    writer.write({"step": 0, "event": "started", "ok": True})  # nothing numeric: no file
    writer.write({"step": 10, "loss": 2.5, "lr": 1e-3, "event": "x", "mesh": {"data": 1}})
    writer.write({"step": 300, "eval_loss": 2.25})
    (path,) = (tmp_path / "tb").iterdir()
    assert path.name.startswith("events.out.tfevents.")
    first, *events = read_events(path)
    assert first.file_version == "brain.Event:2"
    assert [e.step for e in events] == [10, 300]
    assert {v.tag: v.simple_value for v in events[0].summary.value} == {
        "loss": 2.5, "lr": pytest.approx(1e-3)}
    assert events[1].summary.value[0].tag == "eval_loss" and events[1].wall_time > 1.7e9
