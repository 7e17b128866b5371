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

from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import torch

from contsup.config.recipe import Recipe
from contsup.distributed.data_parallel import broadcast_tensors, share_float_buffers, sum_gradients
from contsup.distributed.messages import END_EPOCH, END_EVAL, EVAL, KIND_NAMES, STOP, TRAIN, Inbox, Message, Outbox
from contsup.distributed.stages import Grid, StagePlan, crossing, measure_module_costs
from contsup.distributed.syncbn import convert_sync_batchnorm
from contsup.distributed.timing import Clock, Timings
from contsup.distributed.world import Silent, World, any_rank, RankCollectives
from contsup.errors import ContsupError
from contsup.model.network import GreedyNetwork
from contsup.partition import min_max_split
from contsup.training.device import seed_everything
from contsup.training.evaluation import EvalCounts
from contsup.training.loaders import batches_problem, make_loaders
from contsup.training.order import RANK_SEED
from contsup.training.precision import Precision, to_memory_format
from contsup.training.processes import Batch, Setup, local_batches
from contsup.training.strategies import Check, GreedyStrategy, StepStats, Updates, make_strategy
from contsup.types import Costs


# -- one rank's modules ------------------------------------------------------------------------


class PipelineStage:
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

    def pack(self, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, store: Any) -> tuple[torch.Tensor, ...]:
        """What to send on after module ``last``: h, y, x if a later module needs it, the kept h_j^c."""
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
        return self.pack(h, y, x, store) if self.outgoing is not None else None

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
                z = m.head_output(h)
            counts.add(m, z, y)
        return self.pack(h, y, x, store) if self.outgoing is not None else None


class Link:
    """This rank's messages: from the rank before it (``inbox``), to the rank after it
    (``outbox``), and one message taken early while looking for a stop (``waiting``)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.inbox: Inbox | None = None
        self.outbox: Outbox | None = None
        self.waiting: Message | None = None

    def send(self, message: Message) -> None:
        if self.outbox is not None:
            self.outbox.send(message)

    def receive(self, *expected: int) -> Message:
        if self.waiting is not None:
            message, self.waiting = self.waiting, None
        else:
            message = self.inbox.receive()
        if message.kind not in expected:
            rank = self.world.rank
            raise ContsupError(
                f"rank {rank}: expected a {' or '.join(KIND_NAMES[k] for k in expected)} message from "
                f"rank {rank - 1}, got {KIND_NAMES.get(message.kind, message.kind)}; the ranks run different code"
            )
        return message

    def flush(self) -> None:
        """Wait until the next rank has taken what was sent."""
        if self.outbox is not None:
            self.outbox.flush()


class _Length:
    """Stands in for the training loader on ranks that read no data: its length (batches per
    epoch, from rank 0) and a generator that checkpoints can restore."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return self.n


# -- this rank's part in the run ---------------------------------------------------------------


class Pipeline(RankCollectives):
    """This rank's part in a pipeline run: the first stage of each replica (rank 0 alone with one
    replica) reads its share of the data and drives; the others follow the messages of the rank
    before them. A stop is decided by the first stages and travels down the pipeline in-band;
    checkpoints fall on the same steps everywhere, so every rank knows when one is due."""

    needs_agreement = True
    signal_grace_s = 1.0

    def __init__(self, world: World, recipe: Recipe, run_dir: Path | None = None) -> None:
        d = recipe.distributed
        self.world, self.recipe = world, recipe
        self.rank, self.size, self.is_main = world.rank, world.size, world.is_main
        self.grid = Grid(world.size // d.replicas, d.replicas)
        self.replica, self.stage_index = self.grid.place(world.rank)
        self.keeps_sums = self.replica == 0
        self.is_driver = self.stage_index == 0
        self.clock = Clock()
        self.timings = Timings(world, recipe, run_dir, self.clock)
        self.timings.shape = {"stages": self.grid.stages, "replicas": self.grid.replicas}
        self.link = Link(world)
        self.train_size = 0
        self.images = 0  # the first stages: the images of the batch being trained, over every replica
        self.stage_group: Any = None  # the ranks holding this rank's stage, one per replica

    def loaders(self, recipe: Recipe, dataset: Any, device: torch.device) -> tuple[Any, Any, int]:
        """The first stage of every replica reads its share of each batch and of the test set (all
        of them with one replica, as one process would); the others learn how many batches an
        epoch has."""
        train = test = problem = None
        if self.is_driver:
            train, test, self.train_size = make_loaders(recipe, dataset, device, self.replica, self.grid.replicas)
            problem = batches_problem(recipe, self.train_size, self.grid.replicas, "replicas")
        count, self.train_size, lines = self.world.broadcast_object(
            (len(train), self.train_size, problem.lines if problem else None) if self.world.is_main else None,
            "sharing the number of batches",
        )
        if lines:
            raise ContsupError(*lines) if self.world.is_main else Silent(ContsupError.exit_code)
        return (train, test, self.train_size) if self.is_driver else (_Length(count), None, self.train_size)

    def strategy(self, setup: Setup) -> PipelineStrategy:
        """Plan the stages, take this rank's, and join the ranks holding the same stage."""
        self.clock.device = setup.device
        plan = self._plan_stages(setup)
        first, last = plan.modules(self.stage_index)
        stage = PipelineStage(setup.network, first, last)
        self.timings.modules = list(range(first, last + 1))
        group = self.stage_group = self.world.groups([self.grid.column(s) for s in range(self.grid.stages)])[self.stage_index]
        sync_batchnorm = self.recipe.distributed.sync_batchnorm and group.size > 1
        if sync_batchnorm:  # only the modules this rank trains: the others never train here
            for m in stage.modules:
                convert_sync_batchnorm(m, group.handle, cuda=setup.device.type == "cuda")
        state = [t for m in stage.modules for t in m.state_dict().values() if t.is_floating_point()]
        broadcast_tensors(state, group, "sharing the initial weights")
        if self.replica:
            seed_everything(self.recipe.run.seed + self.replica * RANK_SEED)
        d, world = self.recipe.distributed, self.world
        if stage.incoming is not None:
            self.link.inbox = Inbox(world, world.rank - 1, stage.incoming.count, setup.device, setup.channels_last, self.clock)
        if stage.outgoing is not None:
            self.link.outbox = Outbox(world, world.rank + 1, stage.outgoing.count, d.max_in_flight, self.clock)
        setup.log.write(plan.describe(self.grid.replicas) + "\n")
        setup.log.flush()
        greedy = make_strategy(
            setup.recipe, setup.network, setup.steps_per_epoch, setup.precision,
            sync=lambda optimizer: sum_gradients(optimizer, group, self.clock),
        )
        return PipelineStrategy(greedy, self, stage, group, sync_batchnorm, setup.precision)

    def _plan_stages(self, setup: Setup) -> StagePlan:
        d, k, n = self.recipe.distributed, setup.network.num_modules, self.grid.stages
        if d.stages:
            return StagePlan(tuple(d.stages))
        if n == 1:
            return StagePlan((k,))
        plan = None
        if self.world.is_main:
            micro = -(-self.recipe.data.batch_size // d.micro_batches)
            costs = measure_module_costs(setup, micro)
            plan = StagePlan(min_max_split(Costs(costs), n), costs)
        return self.world.broadcast_object(plan, "sharing the stage plan")

    def batches(self, loader: Any, start_state: torch.Tensor, done: int, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        """The first stages read batches; the others take the first micro-batch of each step
        from the rank before them (the step takes it from ``link.waiting``), until the end of
        the epoch, which they pass on."""
        if self.is_driver:
            batch_size = self.recipe.data.batch_size
            for batch in self.clock.loading(local_batches(loader, start_state, done, device, channels_last, self.train_size, batch_size)):
                self.images = batch.images
                yield batch
            self.link.send(Message(END_EPOCH))
        else:
            while True:
                message = self.link.receive(TRAIN, END_EPOCH)
                if message.kind == END_EPOCH:
                    self.link.send(message)
                    break
                self.link.waiting = message
                yield Batch(None, None, message.batch)
        self.link.flush()

    def any_rank(self, wanted: bool) -> bool:
        """The first stages agree (one all-reduce over them; rank 0 alone without replicas) and
        send a stop down their pipelines; the other stages learn it from the next message."""
        if self.is_driver:
            stop = any_rank(self.stage_group, wanted, "agreeing whether to stop")
            if stop:
                self.link.send(Message(STOP))
            return stop
        message = self.link.receive(TRAIN, STOP, END_EPOCH)
        if message.kind == STOP:
            self.link.send(message)
            return True
        self.link.waiting = message
        return False



class PipelineStrategy(Updates):
    """The greedy step of this rank's modules, micro-batch by micro-batch, each sent on as soon as
    it is done; its test counts and, for checkpoints, the state of every module gathered from the
    rank that trains it."""

    def __init__(
        self, greedy: GreedyStrategy, pipeline: Pipeline, stage: PipelineStage, group: Any, sync_batchnorm: bool,
        precision: Precision,
    ) -> None:
        self.greedy, self.pipeline, self.stage, self.group = greedy, pipeline, stage, group
        self.network, self.updates, self.precision = greedy.network, greedy.updates, precision
        self.sync_batchnorm = sync_batchnorm
        self.modules = tuple(range(stage.first, stage.last + 1))
        self.steps = 0  # steps trained by this object: what its messages say

    @property
    def active_module(self) -> int | None:
        return self.greedy.active_module

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None, stats: StepStats, check: Check, weight: float = 1.0) -> None:
        """The step's micro-batches through this rank's modules; every micro-batch's loss is
        weighted by its share of the step's batch (of all replicas)."""
        p = self.pipeline
        self.steps += 1
        if p.is_driver:
            count = min(p.recipe.distributed.micro_batches, p.images // p.grid.replicas)  # as many on every replica
            for i, (xm, ym) in enumerate(zip(torch.tensor_split(x, count), torch.tensor_split(y, count))):
                self._train(Message(TRAIN, self.steps, i, count, p.images), xm, ym, xm, {}, stats, check)
            return
        message = p.link.receive(TRAIN)
        while True:
            h, y, x, kept = self.stage.unpack(message.tensors)
            self._train(message, h, y, x, kept, stats, check)
            if message.micro == message.micro_count - 1:
                return
            message = p.link.receive(TRAIN)

    def _train(
        self, message: Message, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None, kept: dict, stats: StepStats, check: Check,
    ) -> None:
        first, last = message.micro == 0, message.micro == message.micro_count - 1
        with self.pipeline.clock.measure("compute"):
            out = self.stage.train(self.greedy, h, y, x, kept, len(y) / message.batch, first, last, stats, check)
        if out is not None:
            self.pipeline.link.send(attrs.evolve(message, tensors=out))

    def _share_batchnorm_statistics(self) -> None:
        """Replicas that normalise their own shares end up with different running statistics:
        take replica 0's (nothing to do with one replica, or with synchronised batch norm)."""
        if not self.sync_batchnorm:
            for m in self.stage.modules:
                share_float_buffers(m, self.group, "sharing batch-norm statistics")

    def evaluate(self, loader: Any, device: torch.device, precision: Precision, channels_last: bool) -> EvalCounts:
        """Test batches go through the stages like training ones (each replica its share of the
        test set); each rank counts its heads, the first stages the images, the last the final loss.
        Its waits on other ranks stay out of the epoch's timings, as its time does."""
        with self.pipeline.clock.paused():
            return self._evaluate(loader, device, precision, channels_last)

    def _evaluate(self, loader: Any, device: torch.device, precision: Precision, channels_last: bool) -> EvalCounts:
        self._share_batchnorm_statistics()
        self.network.eval()
        counts = EvalCounts(self.network.num_modules)
        link = self.pipeline.link
        if self.pipeline.is_driver:
            for x, y in loader:
                x = to_memory_format(x.to(device, non_blocking=True), channels_last)
                y = y.to(device, non_blocking=True)
                out = self.stage.evaluate(precision, x, y, x, {}, counts)
                counts.images(len(y))
                if out is not None:
                    link.send(Message(EVAL, batch=len(y), tensors=out))
            link.send(Message(END_EVAL))
        else:
            while True:
                message = link.receive(EVAL, END_EVAL)
                if message.kind == END_EVAL:
                    link.send(message)
                    break
                h, y, x, kept = self.stage.unpack(message.tensors)
                out = self.stage.evaluate(precision, h, y, x, kept, counts)
                if out is not None:
                    link.send(attrs.evolve(message, tensors=out))
        self.network.train()
        link.flush()
        return counts

    def state(self) -> dict[str, Any]:
        """Every module's weights, optimizer, schedule and scaler, each from its owner in replica 0
        (replicas hold the same), assembled on rank 0 in the one-process layout (elsewhere: this
        rank's own, which nobody writes)."""
        self._share_batchnorm_statistics()
        part = {}
        if self.pipeline.replica == 0:
            for i in (m - 1 for m in self.modules):
                part[i] = _to_cpu({"module": self.network.blocks[i].state_dict(), **self.updates[i].state_dict()})
        parts = self.pipeline.world.gather_objects(part, "gathering every module's state")
        own = super().state()
        if parts is None:
            return own
        model = dict(own["model"])
        per_module = [u.state_dict() for u in self.updates]
        for got in parts[1:]:  # rank 0's own modules are in its own state already
            for i, p in got.items():
                model.update({f"blocks.{i}.{k}": v.to(model[f"blocks.{i}.{k}"].device) for k, v in p["module"].items()})
                per_module[i] = {key: p[key] for key in ("optimizer", "scheduler", "scaler")}
        return {
            "model": model, "optimizers": [s["optimizer"] for s in per_module],
            "schedulers": [s["scheduler"] for s in per_module], "scalers": [s["scaler"] for s in per_module],
        }


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside it moved to the CPU (for gathering to rank 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


__all__ = ["Pipeline", "PipelineStage", "PipelineStrategy", "Link"]
