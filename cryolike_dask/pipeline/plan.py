"""Block planning: template and image block sizes from a memory budget, and batches of blocks.

The planner is pure and knows nothing of FFTs: it asks the kernel for the memory model of a
task (:func:`cryolike_dask.kernels.cross_correlation.kernel_memory`: bytes per template, per
image and per (image, template) pair) and chooses blocks so that a task fits in a fraction of
the worker's memory; a graph holds at most ``max_tasks`` kernel tasks, larger runs are split
into batches of image blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryolike_dask.errors import ParameterError
from cryolike_dask.kernels.cross_correlation import KernelMemory, kernel_memory

#: Kernel tasks per submitted graph (graph construction and scheduling stay cheap below this).
MAX_TASKS_PER_GRAPH = 10_000


def _model(
    n_shells: int, n_inplanes: int, n_displacements: int, complex_bytes: int, device: str = "cpu"
):
    precision = "double" if complex_bytes == 16 else "single"
    return kernel_memory(n_shells, n_inplanes, n_displacements, precision, device)


@dataclass(frozen=True)
class BlockPlan:
    """How a run is split.

    Attributes
    ----------
    n_images, n_templates : int
    image_block, template_block : int
        Images and templates per kernel task.
    blocks_per_batch : int
        Image blocks per submitted graph.
    split_every : int
        Fan-in of the reduction tree over template blocks.
    task_bytes : int
        Estimated peak memory of one kernel task.
    """

    n_images: int
    n_templates: int
    image_block: int
    template_block: int
    blocks_per_batch: int
    split_every: int
    task_bytes: int

    @property
    def n_image_blocks(self) -> int:
        return -(-self.n_images // self.image_block)

    @property
    def n_template_blocks(self) -> int:
        return -(-self.n_templates // self.template_block)

    @property
    def kernel_tasks_per_graph(self) -> int:
        return self.n_template_blocks * min(self.blocks_per_batch, self.n_image_blocks)

    def image_ranges(self) -> list[tuple[int, int]]:
        b = self.image_block
        return [(a, min(self.n_images, a + b)) for a in range(0, self.n_images, b)]

    def template_ranges(self) -> list[tuple[int, int]]:
        b = self.template_block
        return [(a, min(self.n_templates, a + b)) for a in range(0, self.n_templates, b)]

    def batches(self, blocks: list[int] | None = None) -> list[list[int]]:
        """Image-block indices grouped into batches of at most ``blocks_per_batch``."""
        todo = list(range(self.n_image_blocks)) if blocks is None else list(blocks)
        k = self.blocks_per_batch
        return [todo[i : i + k] for i in range(0, len(todo), k)]


def task_memory(
    image_block: int,
    template_block: int,
    n_shells: int,
    n_inplanes: int,
    n_displacements: int,
    complex_bytes: int,
    *,
    full: bool = False,
    work_bytes: int = 256 * 2**20,
) -> int:
    """Estimated peak bytes of one kernel task (the kernel's memory model)."""
    model = _model(n_shells, n_inplanes, n_displacements, complex_bytes)
    return model.task_bytes(image_block, template_block, full=full, work_bytes=work_bytes)


def plan_blocks(
    n_images: int,
    n_templates: int,
    n_shells: int,
    n_inplanes: int,
    n_displacements: int,
    *,
    complex_bytes: int = 8,
    memory_bytes: int = 4 * 2**30,
    templates_per_block: int | None = None,
    images_per_block: int | None = None,
    full: bool = False,
    work_bytes: int = 256 * 2**20,
    max_tasks: int = MAX_TASKS_PER_GRAPH,
    split_every: int = 8,
    min_tasks: int = 1,
    device: str = "cpu",
) -> BlockPlan:
    """Choose block sizes that fit ``memory_bytes`` per task (worker memory / threads).

    Explicit ``templates_per_block`` / ``images_per_block`` are kept as given. Otherwise the
    template block takes at most 40 % of the budget (all templates if they fit) and the image
    block at most 25 %, capped at 4096 images; sizes are then evened out so that blocks have
    nearly equal sizes. ``min_tasks`` (e.g. twice the cluster's threads) makes image blocks
    smaller, down to 16 images, until there are that many kernel tasks. ``device`` selects
    the kernel's memory model (``"gpu"`` counts what lives in device memory).
    """
    if n_images < 1 or n_templates < 1:
        raise ParameterError(f"nothing to do: {n_images} images, {n_templates} templates")
    model: KernelMemory = _model(n_shells, n_inplanes, n_displacements, complex_bytes, device)
    fixed = int(model.fixed + work_bytes * model.work_factor)
    usable = max(memory_bytes - fixed, memory_bytes // 4)
    if templates_per_block is None:
        tb = max(1, min(n_templates, int(0.4 * usable // model.per_template)))
        tb = -(-n_templates // -(-n_templates // tb))  # even out
    else:
        tb = max(1, min(int(templates_per_block), n_templates))
    if images_per_block is None:
        per_image = model.per_image + tb * (model.per_pair + (model.per_pair_full if full else 0))
        ib = int(max(1, min(n_images, 4096, 0.25 * usable // per_image)))
        # enough tasks to keep every worker thread busy (blocks of at least 16 images)
        n_tb = -(-n_templates // tb)
        wanted_blocks = -(-min_tasks // n_tb)
        if -(-n_images // ib) < wanted_blocks:
            ib = max(min(16, n_images), -(-n_images // wanted_blocks))
        ib = -(-n_images // -(-n_images // ib))
    else:
        ib = max(1, min(int(images_per_block), n_images))
    n_t = -(-n_templates // tb)
    per_batch = max(1, max_tasks // n_t)
    mem = model.task_bytes(ib, tb, full=full, work_bytes=work_bytes)
    return BlockPlan(n_images, n_templates, ib, tb, per_batch, max(2, split_every), mem)


def describe(plan: BlockPlan) -> str:
    """One line for logs: blocks, tasks and memory."""
    return (
        f"{plan.n_images} images in {plan.n_image_blocks} blocks of ≤{plan.image_block}, "
        f"{plan.n_templates} templates in {plan.n_template_blocks} blocks of ≤"
        f"{plan.template_block}; ≤{plan.kernel_tasks_per_graph} kernel tasks per graph; "
        f"~{plan.task_bytes / 2**20:.0f} MiB per task"
    )
