"""Index-width choice shared by the Triton launchers."""

INT32_LIMIT = 2**31


def needs_int64(*tensors) -> bool:
    """True when some tensor's element count or largest element offset does not fit in int32 (None: skipped).

    Kernels then compute offsets in 64 bits; otherwise in 32 bits, which is markedly cheaper on the GPU.
    """
    for t in tensors:
        if t is None:
            continue
        max_offset = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if t.numel() >= INT32_LIMIT or max_offset >= INT32_LIMIT:
            return True
    return False
