"""What only the stand-in has: its accounting (``cupy._standin.stats()``, ``reset()``)."""

from cupy._device import state


def stats():
    """This process's counts since the last :func:`reset`.

    ``uploads``/``upload_bytes``: host-to-device copies (``cupy.asarray``/``array`` of host
    data, ``ndarray.set``); ``host_syncs``/``sync_bytes``: device-to-host reads (``.get()``,
    ``cupy.asnumpy``, ``item``, ``tolist``, ``float``/``int``/``bool``/``complex``,
    ``repr``, and ``synchronize`` calls with 0 bytes); ``device_calls``: calls that touch
    the device (array operations and creation, runtime queries); ``allocations``: device
    buffers created; ``live_bytes``: bytes of device buffers alive now (all devices);
    ``peak_bytes``: the most live at any time; ``physical_device``: the physical GPU of the
    current device (its ``CUDA_VISIBLE_DEVICES`` entry; None without devices); ``pid``.
    """
    return state.stats()


def reset():
    """Zero the counts; the peak restarts from the bytes live now."""
    state.reset()
