"""LCATracker: exact, adaptive LCA inside an ordinary PyTorch training loop.

    tracker = lca_ext.LCATracker(model, loss_fn, lca_data=(X, Y))
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward()
        with tracker.step():        # snapshots θ_t on entry, allocates on exit
            opt.step()
    run = tracker.result()

Any model and loop: ``LCATracker(model, lca_data=loader, batch_loss=f)`` with
``f(model, batch) -> mean loss or (mean loss, weight)`` (lca_ext.evaluate,
lca_ext.lca_set), and ``tracker.attach(optimizer)`` instead of the ``with`` block
(lca_ext.integrations.optimizer).

One tracked step:
  begin   θ_t is copied into a snapshot buffer; g(θ_t) is reused from the previous
          step's end point (computed afresh only after an untracked step, or
          when θ was written outside a tracked step).
  end     ḡ, the average gradient along θ_t → θ_{t+1} over the whole LCA set, by
          the rule of ``rule`` (lca_ext.rules: by default Simpson, one pass for 95%
          error bars, refined locally within a pass budget, lca_ext.budget_rule;
          the samples it judges are per-tensor sums of the fused op, LCA being
          linear in ḡ); passes through
          lca_ext.evaluate (no side effects on the training).  Then one fused
          pass (lca_ext.allocate) gives the per-tensor sums, sign counts,
          per-neuron sums, histogram and per-parameter state.

Memory beyond the model, optimiser and .grad, in fp32 values per tracked
parameter (autograd's transient per-batch gradient aside): the default and
certified rules hold θ_t 1, the path point 1 and the gradients at θ_t, the
midpoint and θ_{t+1} (= 5); the default rule also keeps each LCA group's
gradient at θ_t and θ_{t+1} for its two-pass stage (2G resident, 16 for the
default 8 groups) while they fit the objective's share of
``path_memory_budget``, and both rules one per refined point in what is left
of it (points beyond it are recomputed once); the total-only rules ("adaptive",
"simpson") hold 4 (θ_t, Q, O and one that holds the midpoint, then g(θ_{t+1}));
a refined step there lends that buffer to its points, so the next step
recomputes its start gradient.  ``reuse_gradients=False`` is the low-memory mode:
3 buffers (θ_t, ḡ, the current point), recomputing instead of reusing.
Each named eval set adds Q, g_end and O (3).  Per-parameter statistics: cum_lca
(1), helped_steps (1, int32), and with ``oscillation=True`` two int32 counters
and two int8 signs (2.5).  Per-class LCA, when 3·C gradient-sized buffers fit
``class_memory_budget`` (per-class mode): the LCA set's three gradient buffers
carry a class dimension (3·C instead of 3, plus 1 for the whole-set ḡ), and
every pass is a class pass whose class gradients add up to the total
(lca_ext.classes), so per-class LCA costs no extra pass.  Otherwise the class
gradients are recomputed at each point of the step's rule, in groups of
classes that fit the budget (one class pass per point and group).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import arguments
from . import distributed as dist_support
from . import kernels
from . import quadrature, rules
from .evaluate import Evaluator, classic_batch_loss
from .flags import StepFlags
from .lca_set import LCASet
from .objective import Objective
from .params import ParameterSet, check_layout, layout
from .buffer_pool import BufferPool
from .path import StepPath
from .rule_options import RuleOptions, rule_options
from .run import Run, load_run  # noqa: F401  (a run is plain data: lca_ext/run.py)
from .statistics import Statistics, StatsOptions, stats_options
from .store_link import StoreLink, StoreOptions, store_options

# per-step fields of every objective, and the per-parameter state fields
STEP_FIELDS = ("loss_before", "loss_after", "lca_sum", "error", "splits", "grad_passes",
               "tensor_sums", "counts", "row_sums", "histogram")
STATE_FIELDS = ("cum_lca", "helped_steps", "direction_changes", "grad_sign_changes",
                "last_delta_sign", "last_grad_sign")


def _or_nan(values, k: int) -> np.ndarray:
    """[K] float64, NaN where the rule gave none (no bars: lca_ext.bars)."""
    return np.full(k, np.nan) if values is None else np.asarray(values, dtype=np.float64)


class LCATracker:
    """Tracks LCA of the steps taken inside ``with tracker.step():``.

    model:      the nn.Module being trained (its trainable parameters are tracked)
    loss_fn:    loss_fn(model(x), y) -> the *mean* loss of an (x, y) batch; or
    batch_loss: batch_loss(model, batch) -> the batch's mean loss, or a
                (mean loss, weight) pair when batches weigh differently (e.g. the
                number of label tokens that are not -100); the LCA loss is the
                exact weighted mean over the whole set (weight default: the
                batch's number of examples).  Give exactly one of the two.
    lca_data:   the fixed LCA set: an (inputs, targets) tensor pair (cut into
                ``batch_size`` chunks), a Dataset, a DataLoader without shuffling,
                or any re-iterable of batches of any form (tensor, tuple, dict,
                BatchEncoding, nested), re-read on every pass and moved to the
                model's device (see lca_ext.lca_set); ``cache=True`` keeps the
                moved batches
    eval_sets:  {"val": data, ...}: more sets whose loss change is allocated with
                the same Δθ (same data forms as lca_data)
    autocast:   None (passes outside any autocast, also one a framework wrapped
                into model.forward) or a dtype such as torch.bfloat16
    pass_dtype: "auto" (float32 passes for bf16/fp16 parameters, the parameters'
                own precision otherwise), None (always their own) or a dtype;
                see lca_ext.evaluate
    rule:       a lca_ext.RuleOptions (or a dict of its fields): the path rule
                and its tolerances.  The default, "budget", is Simpson with 95%
                error bars (``tensor_error``), refined within ``max_passes`` a
                step (lca_ext.budget_rule); "certified" refines until every
                tensor's estimated error is within tolerance (lca_ext.quadrature).
    method, rtol, atol, max_splits: shorthands for the same RuleOptions fields
                (give these or ``rule``, not both).  method="adaptive" is the
                cheaper total-only rule (trapezoid, Simpson, composite Simpson,
                the first that grounds the total); with reuse_gradients=False
                it is "simpson"
    schedule:   None (every step), an int k (every k-th step, starting at 0) or
                a collection of step indices; untracked steps cost nothing
    num_classes: per-class LCA of the LCA set; class_memory_budget (bytes)
                bounds the stacked class gradients (per-class mode when three
                stacks fit: the module docstring's memory paragraph and the Any model
                guide).  The classes: ``targets(batch)``
                (default: the second element of an (inputs, targets) pair, or
                batch["labels"]).  With loss_fn: one class per example.  With
                batch_loss: any targets (tokens too), each class's share computed
                with the other targets set to -100, so batch_loss must return
                (mean, weight) with the weight counting the targets it averages
                (the shares must add up: checked)
    batchnorm:  "batch" (statistics of each fixed LCA batch) or "eval"; see
                lca_ext.evaluate
    stats:      a lca_ext.StatsOptions (or a dict of its fields): what each step
                records besides the per-tensor sums and counts (histogram edges,
                per-neuron sums, oscillation counters, frames); see
                lca_ext.statistics
    bin_edges, row_sums, oscillation, frames, frame_every: shorthands for the
                same StatsOptions fields (give these or ``stats``, not both);
                defaults: 50 signed-log bins over 1e-12..1, row sums and
                oscillation counters on, no frames
    store:      a run directory to append every tracked step to (crash-safe;
                see lca_ext.store), or a lca_ext.StoreOptions(path, resume,
                state_every) (or a dict of its fields); ``resume=True``
                continues an existing one.
                Every committed step records a fingerprint of θ_{t+1}; a resume
                requires the model to be the θ of the run's last commit *and* a
                per-parameter state saved there, and raises
                lca_ext.store.RunStoreError otherwise, naming the committed step
                the model matches and what to do: restore the checkpoint of a
                step with a saved state, cut the run back to it with
                ``lca_ext.truncate_run(store, steps)``, then resume.  Step labels
                continue from that state's.  Refused rather than guessed: a
                resume from an older state would count steps twice, one from a
                newer θ with an older state (state_every > 1) would miss steps.
    resume, state_every: shorthands for the StoreOptions fields, beside a path.
                state_every: write the per-parameter state with every k-th
                committed step (and in ``result()``); the latest two such states
                are kept, so a run can be cut back by one commit without
                ``save_state()``.  A state point is 6 flat arrays, about 18 bytes
                a parameter.  See ``save_state()`` for the states truncate_run
                may cut back to.
    distributed: None (default: automatic), False, True or a ProcessGroup.
                Under torch.distributed (DDP or FSDP2 ``fully_shard``), the LCA
                set is sharded across ranks and every gradient pass sums over
                ranks: see lca_ext.distributed.  Each rank builds its tracker
                with the same arguments; rank 0 writes the store.  With FSDP2,
                ``result()`` gathers per-parameter state: call it on every rank.
    shard_lca_data: True (default): lca_data / eval_sets are the whole sets,
                given on every rank, and the tracker takes this rank's share
                (example i -> rank i mod world).  False: each rank passes its
                own share already.
    reuse_gradients: True (default): keep every gradient for reuse (the
                buffers of the module docstring's memory paragraph; g(θ_{t+1}) starts the next step).  It is recomputed
                when any module buffer changed between the steps (every buffer
                is compared, whether or not the loss reads it, except BatchNorm
                running statistics under batchnorm="batch"; e.g. eval-mode
                BatchNorm statistics, a step counter), when θ was written
                outside a tracked step, or after a refined step.  False: the low-memory
                mode, 3 buffers (θ_t, ḡ, the current point); every step
                recomputes its start gradient and a refined step is recomputed
                from scratch with twice the intervals.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None, lca_data=None,
                 *, batch_loss: Optional[Callable] = None,
                 eval_sets: Optional[Dict[str, object]] = None,
                 autocast: Optional[torch.dtype] = None, cache: bool = False,
                 targets: Optional[Callable] = None,
                 rule: Union[None, RuleOptions, dict] = None,
                 method: Optional[str] = None, rtol: Optional[float] = None,
                 atol: Optional[float] = None, max_splits: Optional[int] = None,
                 pass_dtype="auto", schedule: Union[None, int, Iterable[int]] = None,
                 num_classes: Optional[int] = None, class_memory_budget: int = 2 << 30,
                 batch_size: Optional[int] = None, batchnorm: str = "batch",
                 stats: Union[None, StatsOptions, dict] = None,
                 bin_edges: Optional[torch.Tensor] = None, row_sums: Optional[bool] = None,
                 oscillation: Optional[bool] = None, frames: Optional[Sequence[str]] = None,
                 frame_every: Optional[int] = None,
                 store: Union[None, str, os.PathLike, StoreOptions, dict] = None,
                 resume: Optional[bool] = None, state_every: Optional[int] = None,
                 reuse_gradients: bool = True, distributed=None, shard_lca_data: bool = True):
        schedule = arguments.check(model, loss_fn, batch_loss, lca_data, schedule,
                                   batch_size, num_classes)
        num_classes = None if num_classes is None else int(num_classes)   # (numpy ints too)
        # the options, grouped by concern: the rule, the statistics, the store
        self.rule = rule_options(rule, method=method, rtol=rtol, atol=atol,
                                            max_splits=max_splits)
        arguments.check_bars(self.rule, reuse_gradients)
        stats_opts = stats_options(stats, bin_edges=bin_edges, row_sums=row_sums,
                                   oscillation=oscillation, frames=frames,
                                   frame_every=frame_every)
        store_opts = store_options(store, resume=resume, state_every=state_every)
        model = dist_support.unwrap(model)   # DDP: track (and evaluate) .module
        self.model = model
        self.ctx = dist_support.context(model, distributed)
        if self.ctx.sharded and num_classes:
            raise NotImplementedError("lca_ext.LCATracker: num_classes with FSDP2 is not "
                                      "supported yet; use DDP or num_classes=None")
        params = ParameterSet.from_model(model)
        self._tracked_ids = frozenset(id(p) for p in params.params)
        self._layout = layout(model)    # checked at every step (lca_ext.params)
        self._shapes = [list(p.shape) for p in params.params]    # whole tensors
        # FSDP2: from here on the tracker sees this rank's shards only
        self.params = dataclasses.replace(params, params=self.ctx.local(params.params))
        sets = {"train": lca_data, **(eval_sets or {})}
        bl = batch_loss if batch_loss is not None else classic_batch_loss(loss_fn)
        share = dict(rank=self.ctx.rank, world=self.ctx.world) if shard_lca_data else {}
        self.objectives = [
            Objective(name, Evaluator(
                model, bl,
                LCASet(data, batch_size=batch_size, cache=cache,
                       min_batches=self.rule.groups if self.rule.with_bars else 1,
                       name="lca_data" if name == "train" else f"eval_sets[{name!r}]",
                       **share),
                self.params, batchnorm=batchnorm, ctx=self.ctx, autocast=autocast,
                targets=targets, pass_dtype=pass_dtype,
                num_classes=num_classes if name == "train" else None),  # (eval sets: unsplit)
                self.rule, account=reuse_gradients)   # (the low-memory rule has no budget)
            for name, data in sets.items()]
        for obj in self.objectives:
            obj.evaluator.check_examples()  # interacting examples; reduction='sum' refused
        self.schedule = schedule            # None, an int k, or a frozenset of steps
        self.num_classes = num_classes
        self.class_memory_budget = class_memory_budget
        self.reuse_gradients = reuse_gradients
        dev = self.params.params[0].device
        self.kernels = kernels.kernels_for(dev)   # fused ops, or the reference where none
        # per-class mode: the LCA set's gradient buffers carry a class dimension and
        # its passes are class passes, whose class gradients add up to the total
        # (no plain pass, the class start gradients reused), when three such
        # buffers fit class_memory_budget; otherwise quadrature.recomputed_classes recomputes the class
        # gradients at the step's points, in groups that fit
        # recycled gradient buffers (float64 for float64 parameters), by class count
        self._pool = BufferPool(self.params.params)
        self.objectives[0].classes = bool(num_classes) and reuse_gradients and \
            3 * num_classes * self._pool.one_buffer <= class_memory_budget
        self._theta_t = [torch.empty_like(p) for p in self.params.params]
        self.stats = Statistics(stats_opts, self.params, model, self.kernels, self.ctx,
                                self._pool.new)
        self.state = self.stats.state           # per-parameter state (cum_lca, ...)
        self.bin_edges = self.stats.bin_edges   # the histogram's edges, on the CPU
        self._records: List[dict] = []
        self._frames: List[dict] = []
        self.next_step = 0          # the label the next optimizer step gets
        self.tracked_count = 0
        self.step_open = False      # between begin() and end()
        self._tracked = False
        self.attached = False     # set by tracker.attach (lca_ext.integrations.optimizer)
        #: the last tracked step's record (a dict of its per-step values), or None
        self.last: Optional[dict] = None
        self.last_frames: Optional[dict] = None   # and its frames, if it stored any
        # parameters' in-place versions at the last end(): a reused start
        # gradient is valid only if nobody wrote θ in between
        self._end_versions: Optional[List[int]] = None
        self.flags = StepFlags(self.rule)   # steps that missed the rule's criteria
        self.store_link: Optional[StoreLink] = None   # the run directory, if any
        if store_opts is not None:
            self.store_link = StoreLink(self, store_opts)
            self.tracked_count = self.store_link.steps_committed
            if self.store_link.next_step is not None:
                self.next_step = self.store_link.next_step   # labels go on from the state's

    # -- the loop-facing API -------------------------------------------------

    def tracks(self, step: int) -> bool:
        """Whether optimizer step ``step`` is tracked under ``schedule``."""
        s = self.schedule
        return s is None or (step % s == 0 if isinstance(s, int) else step in s)

    @contextlib.contextmanager
    def step(self):
        """``with tracker.step(): opt.step()`` — one optimiser step."""
        if self.attached:
            raise RuntimeError(
                "lca_ext.LCATracker.step: this tracker is attached to an optimizer "
                "(tracker.attach), whose hooks already track every optimizer.step(); "
                "drop the `with tracker.step():` block, or detach first (handle.remove())")
        self.begin()
        try:
            yield self
        except BaseException:
            self.step_open = False  # the step did not complete: record nothing
            raise
        self.end()

    def begin(self) -> None:
        """Before the optimiser step: snapshot θ_t (and g(θ_t) if not cached)."""
        if self.step_open:
            raise RuntimeError("lca_ext.LCATracker.begin: the previous step was not "
                               "ended; call end() after the optimiser step")
        if not self.ctx.sharded:    # (FSDP2 swaps its parameters in and out)
            self._layout = check_layout(self.model, self._layout, self._tracked_ids)
        self.step_open = True
        try:
            self._begin()
        except BaseException:
            self.step_open = False   # nothing begun; a half-made start gradient is dropped
            for obj in self.objectives:
                obj.drop_start(self._pool)
            raise

    def _begin(self) -> None:
        self._current = self.next_step
        self._tracked = self.tracks(self.next_step)
        if self._end_versions != [p._version for p in self.params.params]:
            # θ changed since our last end() without passing through step()
            # (a step outside the tracker, a weight projection): g(θ_t) is stale
            for obj in self.objectives:
                obj.drop_start(self._pool)
        if not self._tracked:
            for obj in self.objectives:
                obj.drop_start(self._pool)   # θ is about to change without us watching
            return
        with torch.no_grad():
            for snap, p in zip(self._theta_t, self.params.params):
                snap.copy_(p)
            for obj in self.objectives:
                buffers = obj.evaluator.buffers_that_matter()
                if obj.g_start is not None and not (
                        len(buffers) == len(obj.start_buffers)
                        and all(torch.equal(a, b) for a, b in zip(buffers, obj.start_buffers))):
                    obj.drop_start(self._pool)  # the loss function moved (eval-mode BN stats)
                obj.start_buffers = buffers
                obj.start_passes = 0
                if obj.g_start is None:
                    self._start_pass(obj)

    def end(self) -> None:
        """After the optimiser step: allocate the loss change of θ_t → θ_{t+1}."""
        if not self.step_open:
            raise RuntimeError("lca_ext.LCATracker.end: no step was begun")
        self.step_open = False
        step = self.next_step
        self.next_step += 1
        if not self._tracked:
            self._end_versions = None
            return
        with torch.no_grad():
            after = [p.detach() for p in self.params.params]
            record = {"step": np.int64(step)}
            self._pending_frames = None
            # the training set last: a failure before it leaves its state untouched
            parts = {id(obj): self._allocate_objective(obj, step, after)
                     for obj in self.objectives[1:] + self.objectives[:1]}
            for obj in self.objectives:     # (flags and charges only for recorded steps)
                part, flag, spent = parts[id(obj)]
                record.update(part)
                balance = obj.account.charge(spent)     # NaN: no pass account
                record[obj.name + "/pass_credit"] = np.float64(
                    np.nan if balance is None else balance)
                self.flags.record(*flag)
            frames = self._pending_frames
            self.tracked_count += 1
        self.last = record
        self.last_frames = frames
        self._end_versions = [p._version for p in self.params.params]
        if self.store_link is not None:
            if not self.store_link.commit(record, frames, self.tracked_count, self.next_step):
                self._records.append(record)   # the other ranks: in memory, for result()
        else:
            self._records.append(record)
            if frames:
                self._frames.append(dict(frames, step=np.int64(step)))

    def save_state(self, tag: Optional[str] = None, keep: Optional[int] = None) -> int:
        """Store the per-parameter state as of the last committed step and keep
        it (a *pinned* state point): ``lca_ext.truncate_run(store, steps)`` can
        then cut the run back to here, so call it where you save a training
        checkpoint (the Trainer and Lightning callbacks do).  Records θ's
        fingerprint and the label of the next step with it, so a resume from
        this checkpoint is checked and continues the labels even when untracked
        steps (``schedule``) came after the last commit.  Costs one state write
        (none if the step's commit just wrote it).  Collective under FSDP2 (call
        on every rank).  Returns the number of committed steps it is at.
        ``tag``: a name kept with it (the callbacks: their checkpoint's).
        ``keep``: keep only the latest ``keep`` pinned states, this one
        included (a state is about 18 bytes a parameter on disk); None keeps
        every one (truncate_run can then cut back to any checkpoint)."""
        if keep is not None and not (isinstance(keep, int) and not isinstance(keep, bool)
                                     and keep >= 1):
            raise ValueError(f"lca_ext.LCATracker.save_state: keep={keep!r}; expected an "
                             "int >= 1 (how many of the latest pinned states to keep) or None")
        if self.store_link is None:
            raise ValueError("lca_ext.LCATracker.save_state: this tracker has no store "
                             "(store=PATH); the per-parameter state is in tracker.state")
        if self.step_open:
            raise RuntimeError("lca_ext.LCATracker.save_state: a step is open; call it "
                               "between steps (after end() / the `with` block)")
        self.store_link.save_state(self.next_step, tag, keep=keep)
        writer = self.store_link.writer
        return writer.steps_committed if writer is not None else self.tracked_count

    def result(self) -> Run:
        """Everything tracked so far, as plain data (the store's, if any).
        Under torch.distributed with a store, ranks other than 0 return the
        per-step records they kept in memory, without state or frames (those are
        in the store).  Warns once, in one line, when steps stopped at the pass
        budget since the last call."""
        self.flags.summary(self.tracked_count, len(self.objectives) > 1)
        link = self.store_link
        if link is not None:
            link.flush_state(self.tracked_count, self.next_step)   # (collective under FSDP2)
            if link.writer is not None:
                return load_run(link.path)
            arrays = {key: np.stack([np.asarray(r[key]) for r in self._records])
                      for key in (self._records[0] if self._records else ())}
            return Run(self.run_meta(), arrays)
        arrays = {}
        if self._records:
            for key in self._records[0]:
                arrays[key] = np.stack([np.asarray(r[key]) for r in self._records])
        frames = {}
        if self._frames:
            for key in self._frames[0]:
                frames[key] = np.stack([np.asarray(f[key]) for f in self._frames])
        return Run(self.run_meta(), arrays, self.state_arrays(), frames)

    # -- what the run store reads (lca_ext.store_link), then internals ----------

    def run_meta(self) -> dict:
        return dict(
            names=list(self.params.names), shapes=[list(s) for s in self._shapes],
            layer_names=list(self.params.layer_names), layer_of=list(self.params.layer_of),
            objectives=[o.name for o in self.objectives], num_classes=self.num_classes,
            bin_edges=self.bin_edges.cpu().tolist(),
            frame_names=[self.params.names[k] for k in self.stats.frame_tensors],
            # (bars as resolved for the method: None stored would read as a
            # different configuration than the same rule written before)
            config=dict(dataclasses.asdict(self.rule), bars=self.rule.with_bars,
                        pass_dtype=str(self.objectives[0].evaluator.compute_dtype),
                        batchnorm=self.objectives[0].evaluator.batchnorm,
                        lca_set_size=self.objectives[0].evaluator.count,
                        world_size=self.ctx.world,
                        eval_set_sizes={o.name: o.evaluator.count for o in self.objectives[1:]}))

    # how a resume is checked (lca_ext.store_link): offline LCA (lca_ext.offline)
    # positions θ itself, step by step, and resumes its parts without the
    # fingerprint check; the framework callbacks first cut the run back to the
    # state saved with the checkpoint the training resumed from
    verify_resume = True
    resume_cuts_back = False

    def state_arrays(self) -> Dict[str, List[np.ndarray]]:
        return {name: [self.ctx.full(k, t).cpu().numpy().copy() for k, t in enumerate(tensors)]
                for name, tensors in self.state.items()}

    def _keeps_groups(self, obj: Objective) -> int:
        """How many groups' gradients this objective's start and end passes may
        keep (the two-pass stage; 0: none): its share of path_memory_budget in
        gradient buffers, θ_t's and θ_{t+1}'s resident.  Not where per-class LCA
        is recomputed at the rule's points (the stage's ḡ is not a sum of points)."""
        if not (self.rule.method == "budget" and self.rule.with_bars and self.reuse_gradients
                and (obj.classes or not (self.num_classes and obj is self.objectives[0]))
                and not self.ctx.sharded):
            return 0
        return self.rule.path_memory_budget // (
            2 * self._pool.one_buffer * len(self.objectives))

    def _start_pass(self, obj: Objective) -> None:
        """g(θ_t), the loss and the class losses there, computed afresh."""
        path = self._path(obj, self._theta_t)
        obj.g_start = self._pool.take(self.num_classes if obj.classes else 0)   # zeroed
        obj.loss_start = path.grad(0.0, obj.g_start)
        obj.class_loss_start = path.last_class_losses
        obj.start_passes = 1
        # the groups' gradients at θ_t too (as the previous end point keeps them):
        # a step's rule does not depend on where tracking began (resume, offline)
        obj.group_start, obj.group_start_losses = path.group_end, path.group_end_losses

    def _path(self, obj: Objective, after) -> StepPath:
        return StepPath(name=obj.name, step=self._current, evaluator=obj.evaluator,
                        kernels=self.kernels, ctx=self.ctx, pool=self._pool,
                        theta_t=self._theta_t, after=after, g_start=obj.g_start,
                        loss_start=obj.loss_start, class_loss_start=obj.class_loss_start,
                        num_classes=self.num_classes or 0, classes=obj.classes,
                        names=self.params.names, group_start=obj.group_start,
                        group_start_losses=obj.group_start_losses,
                        keep_groups=self._keeps_groups(obj))

    def _count_oscillations(self, obj: Objective, after) -> None:
        g0 = self._pool.class_total(obj.g_start) if obj.classes else obj.g_start
        self.stats.count_oscillations(self._theta_t, after, g0)
        if obj.classes:
            self._pool.give(g0)

    @property
    def ungrounded_steps(self) -> List[tuple]:
        """(objective, step) of every step that missed its rule's criteria
        (run.grounded() is False for them; only the first of each cause warns)."""
        return self.flags.ungrounded_steps

    # the rule's options, readable as before (lca_ext.rule_options.RuleOptions)
    method = property(lambda self: self.rule.method, doc="the rule's method (RuleOptions.method)")
    rtol = property(lambda self: self.rule.rtol, doc="RuleOptions.rtol of the rule")
    atol = property(lambda self: self.rule.atol, doc="RuleOptions.atol of the rule")
    max_splits = property(lambda self: self.rule.max_splits,
                          doc="RuleOptions.max_splits of the rule")

    def _allocate_objective(self, obj: Objective, step: int, after) -> tuple:
        """(the objective's part of the step's record, its flags' arguments, the
        passes its rule spent)."""
        ev = obj.evaluator
        passes0 = ev.passes
        is_train = obj is self.objectives[0]
        # the gradient signs are g(θ_t)'s: read them after the rule (a failure in
        # it leaves the counters as they were) where it keeps g(θ_t)'s buffer,
        # before it where it builds ḡ inside that buffer (simpson, adaptive, low memory)
        count = is_train and self.stats.options.oscillation
        keeps_start = self.reuse_gradients and self.rule.method in rules.KEEP_START
        if count and not keeps_start:
            self._count_oscillations(obj, after)
        step_path = self._path(obj, after)
        path = rules.integrate(step_path, obj.account.step_options(self.rule),
                               self.reuse_gradients)
        spent = ev.passes - passes0     # the rule's: the account's (class passes aside)
        avg, loss_after = path.avg, path.loss_after
        d_loss = loss_after - obj.loss_start
        stacked = avg if obj.classes else None     # per-class ḡ, [C, *shape]
        if stacked is not None:
            avg = self._pool.class_total(stacked)
        elif is_train and self.num_classes:      # (its passes may fail: before any state)
            sums, counts, *class_loss = quadrature.recomputed_classes(
                step_path, path.points, self.class_memory_budget)
        if count and keeps_start:
            self._count_oscillations(obj, after)
        res = self.stats.allocate(self._theta_t, after, avg, update_state=is_train)
        lca_sum = res.sums.sum().item()
        flag = (obj.name, step, path, abs(lca_sum - d_loss), step_path.unit_roundoff())
        p = obj.name + "/"
        record = {p + "loss_before": np.float64(obj.loss_start),
                  p + "loss_after": np.float64(loss_after),
                  p + "lca_sum": np.float64(lca_sum),
                  p + "error": np.float64(abs(lca_sum - d_loss)),
                  p + "splits": np.int64(path.splits),
                  p + "grounded": np.bool_(path.grounded),
                  p + "noise_limited": np.bool_(path.noise_limited),
                  p + "tensor_sums": res.sums.cpu().numpy(),
                  p + "tensor_error": np.asarray(path.tensor_error, dtype=np.float64),
                  p + "budget_limited": np.bool_(path.budget_limited),
                  p + "tensor_bias": _or_nan(path.tensor_bias, res.sums.shape[0]),
                  p + "tensor_sd": _or_nan(path.tensor_sd, res.sums.shape[0]),
                  p + "bar_dof": np.int64(path.bar_dof),
                  p + "counts": res.counts.cpu().numpy(),
                  p + "row_sums": res.row_sums.cpu().numpy(),
                  p + "histogram": res.histogram.cpu().numpy()}
        if stacked is not None:
            res_c = self.kernels.allocate_classes(self._theta_t, after, stacked)
            sums, counts = res_c.sums.cpu().numpy(), res_c.counts.cpu().numpy()
            class_loss = path.class_loss
        if is_train and self.num_classes:
            record.update({p + "class_sums": sums, p + "class_counts": counts,
                           p + "class_loss_before": np.asarray(class_loss[0], np.float64),
                           p + "class_loss_after": np.asarray(class_loss[1], np.float64)})
        step_path.close()
        record[p + "grad_passes"] = np.int64(ev.passes - passes0 + obj.start_passes)
        if is_train and self.stats.wants_frame(self.tracked_count):
            self._pending_frames = self.stats.frame(self._theta_t, after, avg)
        # θ_{t+1} is the next step's θ_t: keep its gradient (or drop it)
        for buf in [obj.g_start] + [b for b in (avg, stacked)
                                    if b is not None and b is not obj.g_start]:
            self._pool.give(buf)
        obj.start_from_end(path, step_path, self.reuse_gradients, self._pool)
        if not self.reuse_gradients:
            self._pool.clear()  # hold no gradient buffer between steps
        return record, flag, spent

    def attach(self, optimizer: torch.optim.Optimizer):
        """Tracks every ``optimizer.step()`` (torch's step pre/post hooks), with no
        change to the loop; returns a handle whose ``.remove()`` detaches.  See
        lca_ext.integrations.optimizer."""
        from .integrations.optimizer import attach
        return attach(self, optimizer)
