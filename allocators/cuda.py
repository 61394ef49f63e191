"""CUDA backend: CUDA virtual memory management through cuda-python (`cuda.bindings.driver`).

An address range is reserved once (cuMemAddressReserve); committing a page maps a
physical allocation into it (cuMemMap) and opens it to the device (cuMemSetAccess);
decommitting unmaps it. Creating the physical allocation (cuMemCreate) is the slow
call (~200 us a 2 MiB page where measured, against ~1.5 us for cuMemMap), and the one
that fails when the device is full, so `provision` creates them up front and keeps
them for the backend's life: commits then only map a kept page, and unmaps keep it.
Beyond what was provisioned, a commit creates its page and an unmap keeps it for
reuse up to `keep_handles`, releasing the rest (and the kept ones on `trim()`). Every
driver result is checked; an error names the call and carries the driver's message.

A committed page reads as zeros until written, as the host backend's do and as vLLM's
own KV buffer does: cuMemCreate does not clear memory, and a kept page still holds the
KV it held before. vLLM clears blocks it hands out only for caches that need it
(Mamba, mixed precision), and a kernel that multiplies masked-out probabilities (0)
by stale values would turn a stale NaN into a NaN output, so a commit clears its pages
on the backend's own stream before it returns: one wait for all the pages of a call.

One backend serves one device. Under tensor parallelism every rank is its own process
with its own GPU (vLLM's worker runs on cuda:<local rank> and makes it torch's current
device), so each rank's backend names that device in every call: the allocation's and
the access's location, the context made current on whichever thread calls (the pool's
own thread included, which CUDA would otherwise start on device 0), and the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_ext.allocators.errors import DriverError, PhysicalMemoryError


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise DriverError("import cuda.bindings.driver", "ImportError",
                          "the cuda backend needs cuda-python: pip install "
                          "'vllm-ext[vattention-cuda]'") from e
    return driver


class _DeviceMemory:
    """Hands a raw device range to torch through __cuda_array_interface__ (no copy)."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|i1",
                                         "data": (addr, False), "version": 3}


class CudaBackend:
    """Reserve, commit and decommit ranges of a CUDA device's virtual address space."""

    __slots__ = ("_cu", "device_index", "granularity", "_prop", "_access", "_handles", "_spare",
                 "keep_handles", "_provisioned", "_ctx", "_stream")
    device = "cuda"

    def __init__(self, device_index: int | None = None, keep_handles: int = 0,
                 driver=None) -> None:
        """`device_index`: the CUDA device (torch's and the driver's ordinal, both counted
        within CUDA_VISIBLE_DEVICES); None: torch's current device. `driver` stands in for
        `cuda.bindings.driver` in tests without a GPU."""
        if driver is None:
            import torch

            driver = _driver()
            device_index = torch.cuda.current_device() if device_index is None else device_index
            torch.cuda.init()
        self._cu = cu = driver
        self.device_index = device_index or 0
        self._call("cuInit", cu.cuInit, 0)
        device = self._call("cuDeviceGet", cu.cuDeviceGet, self.device_index)
        # torch works in the device's primary context; the pool's own thread must too,
        # or the mapped range is invisible to torch's kernels.
        self._ctx = self._call("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain, device)
        self._current()
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        self._prop = prop
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device_index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self.granularity = int(self._call(
            "cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity, prop,
            cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        self._handles: dict[int, tuple[object, int]] = {}  # mapped address -> (handle, size)
        self._spare: list[tuple[object, int]] = []  # unmapped physical pages kept for reuse
        self.keep_handles = keep_handles
        self._provisioned = 0  # physical pages held for the backend's life, mapped or not
        # Clears run here, apart from the engine's streams.
        self._stream = self._call("cuStreamCreate", cu.cuStreamCreate,
                                  cu.CUstream_flags.CU_STREAM_NON_BLOCKING)

    def _call(self, name: str, fn, *args):
        result, *values = fn(*args)
        if result != self._cu.CUresult.CUDA_SUCCESS:
            _, text = self._cu.cuGetErrorString(result)
            msg = text.decode() if isinstance(text, bytes) else str(text)
            oom = result == self._cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
            raise (PhysicalMemoryError if oom else DriverError)(name, result, msg)
        return values[0] if len(values) == 1 else values

    def _current(self) -> None:
        self._call("cuCtxSetCurrent", self._cu.cuCtxSetCurrent, self._ctx)

    def reserve(self, nbytes: int, alignment: int) -> int:
        self._current()
        return int(self._call("cuMemAddressReserve", self._cu.cuMemAddressReserve,
                              nbytes, alignment, 0, 0))

    def free(self, addr: int, nbytes: int) -> None:
        self._current()
        self.decommit([a for a in self._handles if addr <= a < addr + nbytes], 0)
        self._provisioned = 0
        self.trim()
        self._call("cuMemAddressFree", self._cu.cuMemAddressFree, addr, nbytes)
        self._call("cuStreamDestroy", self._cu.cuStreamDestroy, self._stream)

    def provision(self, nbytes: int, count: int) -> bool:
        """Create `count` physical pages of `nbytes` now, kept for the backend's life;
        all or none (False: the device has no room for them)."""
        self._current()
        made = []
        try:
            for _ in range(count):
                made.append(self._call("cuMemCreate", self._cu.cuMemCreate, nbytes,
                                       self._prop, 0))
        except DriverError as e:
            for handle in made:
                self._call("cuMemRelease", self._cu.cuMemRelease, handle)
            if isinstance(e, PhysicalMemoryError):
                return False
            raise
        self._spare.extend((handle, nbytes) for handle in made)
        self._provisioned += count
        return True

    def _physical(self, nbytes: int):
        # From the end: with every page provisioned (tens of thousands kept), taking
        # from the front would shift the whole list on each map.
        for i in range(len(self._spare) - 1, -1, -1):
            if self._spare[i][1] == nbytes:
                return self._spare.pop(i)[0]
        try:
            return self._call("cuMemCreate", self._cu.cuMemCreate, nbytes, self._prop, 0)
        except PhysicalMemoryError:
            if not self.trim():
                raise
            # Kept pages of another size were in the way and went back: retry once.
            return self._call("cuMemCreate", self._cu.cuMemCreate, nbytes, self._prop, 0)

    def _keep_or_release(self, handle, nbytes: int) -> None:
        """An unmapped physical page: kept while the backend holds fewer pages than it
        provisioned, or fewer than `keep_handles` unmapped ones; else released."""
        held = len(self._handles) + len(self._spare)
        if held < self._provisioned or len(self._spare) < self.keep_handles:
            self._spare.append((handle, nbytes))
        else:
            self._call("cuMemRelease", self._cu.cuMemRelease, handle)

    def commit(self, addrs: Sequence[int], nbytes: int) -> None:
        """Map a physical page of `nbytes` at each of `addrs` and clear them all, with one
        wait; all or none (on failure every page of the call is unmapped again)."""
        self._current()  # called from the pool's thread
        done: list[int] = []
        try:
            for addr in addrs:
                self._map(addr, nbytes)
                done.append(addr)
        except BaseException:
            self.decommit(done, nbytes)
            raise
        try:
            self.clear(addrs, nbytes)
        except BaseException:
            # Clears queued before the failure must finish before their pages go (the
            # error being raised is the one that matters, not this wait's).
            self._cu.cuStreamSynchronize(self._stream)
            self.decommit(done, nbytes)
            raise

    def _map(self, addr: int, nbytes: int) -> None:
        cu = self._cu
        handle = self._physical(nbytes)
        try:
            self._call("cuMemMap", cu.cuMemMap, addr, nbytes, 0, handle, 0)
        except DriverError:
            self._keep_or_release(handle, nbytes)
            raise
        try:
            self._call("cuMemSetAccess", cu.cuMemSetAccess, addr, nbytes, [self._access], 1)
        except DriverError:
            self._call("cuMemUnmap", cu.cuMemUnmap, addr, nbytes)
            self._keep_or_release(handle, nbytes)
            raise
        self._handles[addr] = (handle, nbytes)

    def clear(self, addrs: Sequence[int], nbytes: int) -> None:
        """Zero `nbytes` at each of `addrs` (mapped), on the backend's stream; wait once."""
        cu = self._cu
        for addr in addrs:
            self._call("cuMemsetD8Async", cu.cuMemsetD8Async, addr, 0, nbytes, self._stream)
        self._call("cuStreamSynchronize", cu.cuStreamSynchronize, self._stream)

    def decommit(self, addrs: Sequence[int], nbytes: int) -> None:
        """Unmap each of `addrs` (at the size it was mapped with); their physical pages
        are kept or released (see `_keep_or_release`)."""
        self._current()
        for addr in addrs:
            handle, size = self._handles.pop(addr)
            self._call("cuMemUnmap", self._cu.cuMemUnmap, addr, size)
            self._keep_or_release(handle, size)

    def trim(self) -> int:
        """Release the kept physical pages beyond those provisioned; returns the bytes
        given back."""
        self._current()
        freed = 0
        while self._spare and len(self._handles) + len(self._spare) > self._provisioned:
            handle, size = self._spare.pop()
            self._call("cuMemRelease", self._cu.cuMemRelease, handle)
            freed += size
        return freed

    def tensor(self, addr: int, nbytes: int):
        """An int8 tensor over [addr, addr+nbytes) on this device (no copy); the caller
        maps memory at `addr` first.

        The device is named, not left for torch to infer: torch releases that infer it
        ask the driver which device a pointer belongs to, and refuse an address with no
        memory behind it (pytorch/pytorch#76902); newer ones skip the question when told.
        """
        import torch

        return torch.as_tensor(_DeviceMemory(addr, nbytes), device=f"cuda:{self.device_index}")

    def fence(self):
        """An event after the work queued so far on this device's current stream."""
        import torch

        event = torch.cuda.Event()
        # This device's stream, named: the calling thread's current device is another
        # device's only by mistake, and a fence there would order nothing here.
        event.record(torch.cuda.current_stream(self.device_index))
        return event

    def wait(self, fence) -> None:
        if fence is not None:
            # Runs on the pool's thread, possibly before any other call there: without
            # this device's context current, CUDA would start one on device 0.
            self._current()
            fence.synchronize()
