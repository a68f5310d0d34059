"""Reading TensorBoard event files with the protobuf library, from the schema TensorBoard uses
(an independent decoder for ``transformax.train.tensorboard``)."""

import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from transformax.train import tensorboard

F = descriptor_pb2.FieldDescriptorProto


def event_class():
    """``Event`` / ``Summary`` as in tensorflow/core/util/event.proto (the fields used)."""
    fd = descriptor_pb2.FileDescriptorProto(name="tfx_test_event.proto", package="tfxtest")
    event = fd.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".tfxtest.Summary")
    summary = fd.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".tfxtest.Summary.Value")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfxtest.Event"))


def read_events(path):
    """The events of a TFRecord file, each record's length and data CRCs checked."""
    Event, data, events = event_class(), path.read_bytes(), []
    while data:
        (length,), (len_crc,) = struct.unpack("<Q", data[:8]), struct.unpack("<I", data[8:12])
        body, (body_crc,) = data[12:12 + length], struct.unpack("<I", data[12 + length:16 + length])
        assert len_crc == tensorboard._masked(tensorboard.crc32c(data[:8]))
        assert body_crc == tensorboard._masked(tensorboard.crc32c(body))
        events.append(Event.FromString(body))
        data = data[16 + length:]
    return events
