"""Module-parallel (pipeline) greedy training: each rank owns a contiguous group of modules.

Rank 0 reads the data. For every micro-batch a rank trains its modules exactly as the greedy
step does (context, forward, local loss, backward, step), then sends on, detached, what later
ranks need: its last output h, the labels, x if a later module uses it (context E or a
decoder), and every h_j^c a later module takes as context. Nothing is sent back: a module never
waits for the modules after it, so while rank 1 trains batch t rank 0 already trains batch t+1.
At most ``distributed.max_in_flight`` micro-batches wait in each rank's outbox.

With ``micro_batches = M > 1`` each batch is cut into M micro-batches whose gradients accumulate
(each weighted by its share of the batch) into one optimizer step per batch: the update of the
whole batch, except that batch-norm statistics are those of each micro-batch. With M = 1 the
result is bit-for-bit that of sequential greedy training in one process.

With ``distributed.replicas = R > 1`` the ranks form a grid of S stages x R replicas: replica r
is a whole pipeline on ranks r*S .. r*S + S - 1 (rank = replica * S + stage), whose first stage
reads the r-th share of every batch (as data-parallel ranks do). The ranks holding one stage
sum their modules' gradients before each optimizer step, over a process group of just them,
and synchronise batch-norm statistics over it with ``sync_batchnorm``.
"""

from __future__ import annotations

import collections
import copy
import statistics
import time
from pathlib import Path
from typing import Any, ContextManager, Iterator, Sequence

import attrs
import torch
import torch.distributed as dist

from contsup.distributed.data_parallel import broadcast_tensors, shard_batches, share_float_buffers, sum_gradients
from contsup.distributed.syncbn import convert_sync_batchnorm
from contsup.distributed.timing import Clock
from contsup.distributed.world import Ranks, Silent, World, any_rank
from contsup.errors import ContsupError
from contsup.model.network import GreedyNetwork
from contsup.partition import min_max_split
from contsup.training.device import seed_everything
from contsup.training.evaluation import EvalCounts, Evaluation
from contsup.training.loaders import batches_problem, make_loaders
from contsup.training.order import RANK_SEED
from contsup.training.parallel import Batch, EpochProgress, Gathered, TrainerView
from contsup.training.precision import Precision, to_memory_format
from contsup.training.strategies import Check, GreedyStrategy, StepStats, Strategy, make_strategy
from contsup.types import Costs
from contsup.config.recipe import Recipe

# message kinds
TRAIN, EVAL, END_EPOCH, END_EVAL, STOP = 1, 2, 3, 4, 6
KIND_NAMES = {TRAIN: "train", EVAL: "eval", END_EPOCH: "end of epoch", END_EVAL: "end of evaluation", STOP: "stop"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)
MAX_DIMS = 8
HEAD = 6  # kind, step, micro, micro_count, batch, tensors
SPEC = 2 + MAX_DIMS  # dtype, ndim, dims


# -- which modules each rank owns --------------------------------------------------------------


@attrs.frozen
class Grid:
    """``stages`` x ``replicas`` ranks. Replica r is a whole pipeline on consecutive ranks, so
    rank = replica * stages + stage and the next stage of a rank is the next rank."""

    stages: int
    replicas: int = 1

    def place(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of ``rank``."""
        return divmod(rank, self.stages)

    def column(self, stage: int) -> list[int]:
        """The ranks holding ``stage``, one per replica (replica 0's first)."""
        return [r * self.stages + stage for r in range(self.replicas)]


@attrs.frozen
class StagePlan:
    """Modules per stage (``sizes``; a stage is a rank without replicas) and, when balanced
    automatically, each module's measured seconds per micro-batch (``costs``)."""

    sizes: tuple[int, ...]
    costs: tuple[float, ...] | None = None

    def modules(self, rank: int) -> tuple[int, int]:
        """(first, last) module, 1-based, of ``rank``."""
        first = sum(self.sizes[:rank]) + 1
        return first, first + self.sizes[rank] - 1

    def owner(self, module: int) -> int:
        for rank in range(len(self.sizes)):
            first, last = self.modules(rank)
            if first <= module <= last:
                return rank
        raise ValueError(f"no rank owns module {module}")

    def describe(self, replicas: int = 1) -> str:
        grid = Grid(len(self.sizes), replicas)
        parts = []
        for stage in range(grid.stages):
            first, last = self.modules(stage)
            span = f"module {first}" if first == last else f"modules {first}-{last}"
            if self.costs is not None:
                ms = 1000 * sum(self.costs[first - 1 : last])
                span += f" ({ms:.1f} ms)"
            ranks = grid.column(stage)
            where = f"rank {stage}" if replicas == 1 else f"stage {stage} (ranks {', '.join(map(str, ranks))})"
            parts.append(f"{where}: {span}")
        how = "balanced by measured time per micro-batch" if self.costs is not None else "as distributed.stages says"
        shape = f"{grid.stages} stages" + (f" x {replicas} replicas" if replicas > 1 else "")
        return f"pipeline of {shape}, {how}: " + "; ".join(parts)


@attrs.frozen
class Crossing:
    """What the rank whose last module is ``after`` sends on: h, y, then x if a later module needs
    it, then the h_j^c (``features``, by j) that later modules take as context."""

    after: int
    needs_x: bool
    features: tuple[int, ...]

    @property
    def count(self) -> int:
        return 2 + int(self.needs_x) + len(self.features)


def needs_input(module: Any) -> bool:
    """Whether module l uses x: as a context source (E) or as a reconstruction target."""
    uses_decoder = module.decoder is not None and module.weights[0] != 0.0
    return uses_decoder or any(s.is_input for s in module.sources)


def crossing(network: Any, after: int) -> Crossing:
    """What crosses the boundary after module ``after`` (1-based) of ``network``."""
    later = [m for m in network.blocks if m.index > after]
    features = sorted({s.index for m in later for s in m.sources if not s.is_input and s.index + 1 <= after})
    return Crossing(after, any(needs_input(m) for m in later), tuple(features))


# -- messages -------------------------------------------------------------------------------------


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


# -- one rank's modules ------------------------------------------------------------------------



class Stage:
    """Trains and evaluates modules ``first..last`` of a network, as the greedy step does."""

    def __init__(self, network: GreedyNetwork, first: int, last: int) -> None:
        self.network = network
        self.modules = [m for m in network.blocks if first <= m.index <= last]
        self.first, self.last = first, last
        self.incoming = crossing(network, first - 1) if first > 1 else None
        self.outgoing = crossing(network, last) if last < network.num_modules else None

    def unpack(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
        """A received micro-batch: h, y, x (None when no module from here on needs it), {j: h_j^c}."""
        c = self.incoming
        h, y = tensors[0], tensors[1]
        x = tensors[2] if c.needs_x else None
        kept = dict(zip(c.features, tensors[2 + int(c.needs_x) :]))
        return h, y, x, kept

    def _pack(self, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, store: Any) -> tuple[torch.Tensor, ...]:
        c = self.outgoing
        out = [h, y] + ([x] if c.needs_x else [])
        return tuple(out + [store.kept[j] for j in c.features])

    def train(
        self, strategy: GreedyStrategy, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, kept: dict,
        weight: float, first_micro: bool, last_micro: bool, stats: StepStats, check: Check,
    ) -> tuple[torch.Tensor, ...] | None:
        """One micro-batch through this rank's modules (h: (B, C, H, W), the input of module
        ``first``); gradients accumulate, scaled by ``weight``, and the last micro-batch steps.
        Returns what to send on."""
        store = self.network.store(x, detach=True)
        store.kept.update(kept)
        for m in self.modules:
            h = strategy.train_module(m, h, store, x, y, stats, check, weight, begin=first_micro, finish=last_micro)
        strategy.active_module = None
        return self._pack(h, y, x, store) if self.outgoing is not None else None

    @torch.no_grad()
    def evaluate(
        self, precision: Precision, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, kept: dict, counts: EvalCounts
    ) -> tuple | None:
        """One test batch through this rank's modules in eval mode, counting each head's answers."""
        store = self.network.store(x, detach=False)
        store.kept.update(kept)
        for m in self.modules:
            with precision.autocast():
                h = store.run(m, h)
                store.release(m.index)
                z = m.head(h)
            counts.add(m, z, y)
        return self._pack(h, y, x, store) if self.outgoing is not None else None


def measure_module_costs(trainer: TrainerView, batch: int, repeats: int = 3) -> tuple[float, ...]:
    """Seconds one greedy step of each module takes on a micro-batch of ``batch`` random images
    (the median of ``repeats`` after one warm-up), on a copy of the network and its strategy."""
    network = copy.deepcopy(trainer.network).train()
    strategy = make_strategy(trainer.recipe, network, trainer.steps_per_epoch, trainer.precision)
    info, device = trainer.built.info, trainer.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *info.input_shape), generator=g).to(device)
    y = torch.randint(0, info.num_classes, (batch,), generator=g).to(device)
    x = to_memory_format(x, trainer.channels_last)
    stats = StepStats(network.num_modules)
    times: list[list[float]] = [[] for _ in network.blocks]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for rep in range(repeats + 1):
            store = network.store(x, detach=True)
            h = x
            for m in network.blocks:
                start = time.perf_counter()
                h = strategy.train_module(m, h, store, x, y, stats, lambda module, loss: None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep:
                    times[m.index - 1].append(time.perf_counter() - start)
    return tuple(statistics.median(t) for t in times)


class _Length:
    """Stands in for the training loader on ranks that read no data: its length (batches per
    epoch, from rank 0) and a generator that checkpoints can restore."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return self.n


class Pipeline:
    """This rank's part in a pipeline run: the first stage of each replica (rank 0 alone with one
    replica) reads its share of the data and drives; the others follow the messages of the rank
    before them. A stop is decided by the first stages and travels down the pipeline in-band;
    checkpoints fall on the same steps everywhere, so every rank knows when one is due."""

    needs_agreement = True
    signal_grace_s = 1.0

    def __init__(self, world: World, recipe: Recipe) -> None:
        d = recipe.distributed
        self.world, self.recipe = world, recipe
        self.is_main = world.is_main
        self.grid = Grid(world.size // d.replicas, d.replicas)
        self.replica, self.stage_index = self.grid.place(world.rank)
        self.is_driver = self.stage_index == 0
        self.micro_batches = d.micro_batches
        self.clock = Clock()
        self.ranks = Ranks(world, recipe, self.clock)
        self.train_size = 0
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None
        self._waiting: Message | None = None  # a message received while looking for a stop
        self._gathered: tuple[tuple[int, int], Gathered] | None = None

    # -- setting up ------------------------------------------------------------------------

    def loaders(self, recipe: Recipe, dataset: Any, device: torch.device) -> tuple[Any, Any, int]:
        """The first stage of every replica reads its share of each batch and of the test set (all
        of them with one replica, as one process would); the others learn how many batches an
        epoch has."""
        train = test = problem = None
        if self.is_driver:
            train, test, self.train_size = make_loaders(recipe, dataset, device, self.replica, self.grid.replicas)
            problem = batches_problem(recipe, self.train_size, self.grid.replicas, "replicas")
        count, self.train_size, lines = self.world.broadcast_object(
            (len(train), self.train_size, problem.lines if problem else None)
            if self.world.is_main else None,
            "sharing the number of batches",
        )
        if lines:
            raise ContsupError(*lines) if self.world.is_main else Silent(ContsupError.exit_code)
        return (train, test, self.train_size) if self.is_driver else (_Length(count), None, self.train_size)

    def attach(self, trainer: TrainerView) -> None:
        """Plan the stages, take this rank's, and join the ranks holding the same stage."""
        self.ranks.attach(trainer)
        self.network, self.device, self.precision = trainer.network, trainer.device, trainer.precision
        self.channels_last = trainer.channels_last
        self.strategy = trainer.strategy
        self.plan = self._plan_stages(trainer)
        first, last = self.plan.modules(self.stage_index)
        self.stage = Stage(self.network, first, last)
        self.owned = list(range(first, last + 1))
        self._join_replicas()
        d, world = self.recipe.distributed, self.world
        if self.stage.incoming is not None:
            self.inbox = Inbox(world, world.rank - 1, self.stage.incoming.count, self.device, self.channels_last, self.clock)
        if self.stage.outgoing is not None:
            self.outbox = Outbox(world, world.rank + 1, self.stage.outgoing.count, d.max_in_flight, self.clock)
        trainer.log.write(self.plan.describe(self.grid.replicas) + "\n")
        trainer.log.flush()

    def _plan_stages(self, trainer: TrainerView) -> StagePlan:
        d, k, n = self.recipe.distributed, self.network.num_modules, self.grid.stages
        if d.stages:
            return StagePlan(tuple(d.stages))
        if n == 1:
            return StagePlan((k,))
        plan = None
        if self.world.is_main:
            micro = -(-self.recipe.data.batch_size // self.micro_batches)
            costs = measure_module_costs(trainer, micro)
            plan = StagePlan(min_max_split(Costs(costs), n), costs)
        return self.world.broadcast_object(plan, "sharing the stage plan")

    def _join_replicas(self) -> None:
        """This stage's group of ranks, one per replica (of one rank without replicas): they start
        from replica 0's weights, may synchronise batch norm, and sum gradients before each step."""
        grid, d = self.grid, self.recipe.distributed
        self.stage_group = self.world.groups([grid.column(s) for s in range(grid.stages)])[self.stage_index]
        self.sync_batchnorm = d.sync_batchnorm and self.stage_group.size > 1
        if self.sync_batchnorm:  # only the modules this rank trains: the others never train here
            for m in self.stage.modules:
                convert_sync_batchnorm(m, self.stage_group.handle, cuda=self.device.type == "cuda")
        state = [t for m in self.stage.modules for t in m.state_dict().values() if t.is_floating_point()]
        broadcast_tensors(state, self.stage_group, "sharing the initial weights")
        if self.replica:
            seed_everything(self.recipe.run.seed + self.replica * RANK_SEED)

    def sync_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        sum_gradients(optimizer, self.stage_group, self.clock)

    # -- sending ---------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        if self.outbox is not None:
            self.outbox.send(message)

    def _receive(self, *expected: int) -> Message:
        if self._waiting is not None:
            message, self._waiting = self._waiting, None
        else:
            message = self.inbox.receive()
        if message.kind not in expected:
            raise ContsupError(
                f"rank {self.world.rank}: expected a {' or '.join(KIND_NAMES[k] for k in expected)} message from "
                f"rank {self.world.rank - 1}, got {KIND_NAMES.get(message.kind, message.kind)}; the ranks run different code"
            )
        return message

    # -- training --------------------------------------------------------------------------

    def begin_epoch(self) -> None:
        self.clock.reset()

    def batches(self, loader: Any, cur: EpochProgress, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        """The first stages read batches; the others take the first micro-batch of each step
        from the rank before them, until the end of the epoch (which they pass on)."""
        if self.is_driver:
            yield from shard_batches(loader, cur, device, channels_last, self.clock, self.train_size, self.recipe.data.batch_size)
            self._send(Message(END_EPOCH))
            return
        while True:
            message = self._receive(TRAIN, END_EPOCH)
            if message.kind == END_EPOCH:
                self._send(message)
                return
            yield Batch(None, None, message.batch, message)

    def train_step(self, strategy: Strategy, batch: Batch, stats: StepStats, check: Check, epoch: int, step: int) -> None:
        """The step's micro-batches through this rank's modules, each sent on as soon as it is done;
        every micro-batch's loss is weighted by its share of the step's batch (of all replicas)."""
        if self.is_driver:
            # as many micro-batches on every replica (their batch-norm exchanges pair up)
            count = min(self.micro_batches, batch.images // self.grid.replicas)
            xs, ys = torch.tensor_split(batch.x, count), torch.tensor_split(batch.y, count)
            for i, (xm, ym) in enumerate(zip(xs, ys)):
                message = Message(TRAIN, step, i, count, batch.images)
                self._train(strategy, message, xm, ym, xm, {}, stats, check, epoch)
            return
        message = batch.message
        while True:
            h, y, x, kept = self.stage.unpack(message.tensors)
            self._train(strategy, message, h, y, x, kept, stats, check, epoch)
            if message.micro == message.micro_count - 1:
                return
            message = self._receive(TRAIN)

    def _train(
        self, strategy: Any, message: Message, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, kept: dict,
        stats: StepStats, check: Check, epoch: int,
    ) -> None:
        first, last = message.micro == 0, message.micro == message.micro_count - 1
        with self.clock.measure("compute"), self.world.guard(f"training step {message.step} of epoch {epoch}"):
            out = self.stage.train(strategy, h, y, x, kept, len(y) / message.batch, first, last, stats, check)
        if out is not None:
            self._send(attrs.evolve(message, tensors=out))

    def agree_stop(self, wanted: bool) -> bool:
        """The first stages agree (one all-reduce over them; rank 0 alone without replicas) and
        send a stop down their pipelines; the other stages learn it from the next message."""
        if self.is_driver:
            stop = any_rank(self.stage_group, wanted, "agreeing whether to stop")
            if stop:
                self._send(Message(STOP))
            return stop
        message = self._receive(TRAIN, STOP, END_EPOCH)
        if message.kind == STOP:
            self._send(message)
            return True
        self._waiting = message
        return False

    def end_training(self) -> None:
        if self.outbox is not None:
            self.outbox.flush()

    def reduce_stats(self, stats: StepStats) -> StepStats:
        """Every module's running sums, each from the ranks that hold it (one per replica)."""
        t = self.world.all_reduce(stats.as_tensor(self.owned).to(self.world.control_device), "summing the training metrics")
        return StepStats.from_tensor(t, stats.modules)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, trainer: TrainerView) -> Evaluation:
        """Test batches go through the stages like training ones (each replica its share of the
        test set); each rank counts its heads, the last stage the final loss, and the counts meet
        on every rank. Its waits on other ranks stay out of the epoch's timings, as its time does."""
        with self.clock.paused():
            return self._evaluate(trainer)

    def _evaluate(self, trainer: TrainerView) -> Evaluation:
        self._share_batchnorm_statistics()
        self.network.eval()
        k = self.network.num_modules
        counts = EvalCounts(k)
        if self.is_driver:
            for x, y in trainer.test_loader:
                x = to_memory_format(x.to(self.device, non_blocking=True), self.channels_last)
                y = y.to(self.device, non_blocking=True)
                out = self.stage.evaluate(self.precision, x, y, x, {}, counts)
                counts.images(len(y))
                if out is not None:
                    self._send(Message(EVAL, batch=len(y), tensors=out))
            self._send(Message(END_EVAL))
        else:
            while True:
                message = self._receive(EVAL, END_EVAL)
                if message.kind == END_EVAL:
                    self._send(message)
                    break
                h, y, x, kept = self.stage.unpack(message.tensors)
                out = self.stage.evaluate(self.precision, h, y, x, kept, counts)
                if out is not None:
                    self._send(attrs.evolve(message, tensors=out))
        self.network.train()
        self.end_training()
        # images are counted by the first stages only, the final loss by the last stages only
        t = self.world.all_reduce(counts.as_tensor(self.owned).to(self.world.control_device), "summing the test results")
        return EvalCounts.from_tensor(t, k).result()

    def _share_batchnorm_statistics(self) -> None:
        """Replicas that normalise their own shares end up with different running statistics:
        take replica 0's (nothing to do with one replica, or with synchronised batch norm)."""
        if not self.sync_batchnorm:
            for m in self.stage.modules:
                share_float_buffers(m, self.stage_group, "sharing batch-norm statistics")

    def record_epoch(self, epoch: int, images: int, elapsed: float) -> None:
        self.ranks.record_epoch(epoch, images, elapsed, self.owned, self._shape())

    # -- checkpoints -----------------------------------------------------------------------

    def gather(self, trainer: TrainerView) -> Gathered:
        """Bring every module's weights, optimizer, schedule and scaler from its owner in
        replica 0 (replicas hold the same) into rank 0's copy of the network and strategy, and
        the epoch's running sums of every rank; once per position of the run."""
        here = (trainer.info.step, len(trainer.history))
        if self._gathered is not None and self._gathered[0] == here:
            return self._gathered[1]
        self._share_batchnorm_statistics()
        partial = self.reduce_stats(trainer.current.stats) if trainer.mid_epoch() else None
        s = self.strategy
        part = {}
        for i in (m - 1 for m in self.owned if self.replica == 0):
            part[i] = _to_cpu({
                "module": self.network.blocks[i].state_dict(),
                "optimizer": s.optimizers[i].state_dict(),
                "scheduler": s.schedulers[i].state_dict(),
                "scaler": s.scalers[i].state_dict(),
            })
        parts = self.world.gather_objects(part, "gathering every module's state")
        if self.world.is_main:
            for rank, got in enumerate(parts):
                if rank == 0:
                    continue
                for i, p in got.items():
                    self.network.blocks[i].load_state_dict(p["module"])
                    s.optimizers[i].load_state_dict(p["optimizer"])
                    s.schedulers[i].load_state_dict(p["scheduler"])
                    s.scalers[i].load_state_dict(p["scaler"])
        gathered = self.ranks.gathered(partial)
        self._gathered = (here, gathered)
        return gathered

    def restore(self, state: dict, resumed: EpochProgress | None) -> None:
        self.ranks.restore(state, resumed, keeps_sums=self.replica == 0)

    def resume_command(self, run_dir: Path) -> str:
        return self.ranks.resume_command(run_dir)

    def guard(self, what: str) -> ContextManager[None]:
        return self.world.guard(what)

    def finish(self, run_dir: Path) -> None:
        self.ranks.finish(run_dir, self._shape())

    def report(self) -> dict:
        return self.ranks.report(self._shape())

    def _shape(self) -> dict:
        return {"stages": self.grid.stages, "replicas": self.grid.replicas}


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside it moved to the CPU (for gathering to rank 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


__all__ = ["Pipeline", "Grid", "StagePlan", "Stage", "Crossing", "crossing", "measure_module_costs"]
