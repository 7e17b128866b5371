"""The pipeline's messages between consecutive ranks: a fixed-size int64 header (the kind, the
position, each tensor's dtype and shape) followed by the tensors, sent without waiting (at most
``distributed.max_in_flight`` in flight) and received under the run's deadline."""

from __future__ import annotations

import collections

import attrs
import torch
import torch.distributed as dist

from contsup.distributed.timing import Clock
from contsup.distributed.world import World
from contsup.training.precision import to_memory_format

# message kinds
TRAIN, EVAL, END_EPOCH, END_EVAL, STOP = 1, 2, 3, 4, 6
KIND_NAMES = {TRAIN: "train", EVAL: "eval", END_EPOCH: "end of epoch", END_EVAL: "end of evaluation", STOP: "stop"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)
MAX_DIMS = 8
HEAD = 6  # kind, step, micro, micro_count, batch, tensors
SPEC = 2 + MAX_DIMS  # dtype, ndim, dims


@attrs.frozen
class Message:
    kind: int
    step: int = 0
    micro: int = 0
    micro_count: int = 1
    batch: int = 0
    tensors: tuple[torch.Tensor, ...] = ()


def encode_header(message: Message, slots: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fixed-size int64 header: the kind, the position, and each tensor's dtype and shape."""
    if len(message.tensors) > slots:
        raise ValueError(f"{len(message.tensors)} tensors do not fit a header of {slots} slots")
    values = [message.kind, message.step, message.micro, message.micro_count, message.batch, len(message.tensors)]
    for t in message.tensors:
        if t.dim() > MAX_DIMS:
            raise ValueError(f"a tensor of {t.dim()} dimensions cannot be sent (at most {MAX_DIMS})")
        values += [DTYPES.index(t.dtype), t.dim(), *t.shape, *([0] * (MAX_DIMS - t.dim()))]
    values += [0] * (SPEC * (slots - len(message.tensors)))
    return torch.tensor(values, dtype=torch.int64, device=device)


def decode_header(header: torch.Tensor) -> tuple[Message, list[tuple[torch.dtype, tuple[int, ...]]]]:
    """The message (without tensors) and the dtype and shape of each tensor that follows."""
    v = header.tolist()
    kind, step, micro, micro_count, batch, n = v[:HEAD]
    specs = []
    for i in range(n):
        spec = v[HEAD + i * SPEC : HEAD + (i + 1) * SPEC]
        specs.append((DTYPES[spec[0]], tuple(spec[2 : 2 + spec[1]])))
    return Message(kind, step, micro, micro_count, batch), specs


class Outbox:
    """Sends to the next rank without waiting, keeping at most ``limit`` messages in flight."""

    def __init__(self, world: World, dst: int, slots: int, limit: int, clock: Clock) -> None:
        self.world, self.dst, self.slots, self.limit, self.clock = world, dst, slots, limit, clock
        self.pending: collections.deque = collections.deque()

    def send(self, message: Message) -> None:
        while len(self.pending) >= self.limit:
            self._wait_oldest()
        header = encode_header(message, self.slots, self.world.control_device)
        tensors = [t.contiguous() for t in message.tensors]
        with self.world.guard(f"sending a {KIND_NAMES[message.kind]} message to rank {self.dst}"):
            works = [dist.isend(header, self.dst)] + [dist.isend(t, self.dst) for t in tensors]
        self.pending.append((works, header, tensors))

    def _wait_oldest(self) -> None:
        works, _, _ = self.pending.popleft()
        with self.clock.measure("send"), self.world.guard(f"waiting for rank {self.dst} to take a message"):
            for work in works:
                work.wait(self.world.timeout)

    def flush(self) -> None:
        while self.pending:
            self._wait_oldest()


class Inbox:
    """Receives the previous rank's messages, each wait under the run's deadline."""

    def __init__(self, world: World, src: int, slots: int, device: torch.device, channels_last: bool, clock: Clock) -> None:
        self.world, self.src, self.slots, self.device, self.clock = world, src, slots, device, clock
        self.channels_last = channels_last

    def receive(self) -> Message:
        header = torch.empty(HEAD + SPEC * self.slots, dtype=torch.int64, device=self.world.control_device)
        with self.clock.measure("receive"), self.world.guard(f"waiting for rank {self.src}"):
            dist.irecv(header, self.src).wait(self.world.timeout)
            message, specs = decode_header(header)
            tensors = []
            for dtype, shape in specs:
                t = torch.empty(shape, dtype=dtype, device=self.device)
                dist.irecv(t, self.src).wait(self.world.timeout)
                tensors.append(to_memory_format(t, self.channels_last) if t.is_floating_point() else t)
        return attrs.evolve(message, tensors=tuple(tensors))


__all__ = [
    "Message", "Inbox", "Outbox", "encode_header", "decode_header", "TRAIN", "EVAL", "END_EPOCH", "END_EVAL", "STOP",
    "KIND_NAMES", "HEAD", "SPEC",
]
