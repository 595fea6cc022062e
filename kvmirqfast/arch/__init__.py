"""Per-architecture routing rules: ``get_arch("x86")`` / ``get_arch("arm64", nr_spis=...)``.

An arch object has ``name``, ``validate_entry(entry)`` (raises ``InvalidRouting``),
``irqchip_map_key(entry)`` (KVM's chip/pin map key) and ``default_routing_pairs()``.
"""

_ALIASES = {"x86": "x86", "x86_64": "x86", "amd64": "x86",
            "arm64": "arm64", "aarch64": "arm64"}


def get_arch(name, **kw):
    """A new arch instance for ``name`` (x86 / x86_64 / arm64 / aarch64); ValueError otherwise.

    Keyword arguments go to the constructor (``X86Arch(x2apic_format=...)``,
    ``Arm64Arch(nr_spis=...)``).
    """
    canonical = _ALIASES.get(name) if isinstance(name, str) else None
    if canonical == "x86":
        from .x86 import X86Arch
        return X86Arch(**kw)
    if canonical == "arm64":
        from .arm64 import Arm64Arch
        return Arm64Arch(**kw)
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_ALIASES))}")
