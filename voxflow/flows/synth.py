"""Synthetic datasets with ground truth, for demos, tests and the stages that follow."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SYNTH_DEFAULTS", "synthesize"]

SYNTH_DEFAULTS = {"lightsheet": (2, 48, 160, 160), "em-stack": (12, 192, 192)}


def synthesize(
    kind: str,
    output: str,
    *,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    ngff_version: str = "0.5",
    **options,
) -> dict[str, str]:
    """Write a synthetic dataset of `kind` ("lightsheet" or "em-stack") to `output`.

    `options` are generator options of `kind`, passed on to its writer: for "em-stack"
    ``transform``, ``noise`` and ``contrast`` (see `voxflow.tasks.write_em_stack`);
    "lightsheet" takes none.

    Returns
    -------
    dict
        Name → location of everything written.

    Raises
    ------
    TypeError
        For an option that `kind` does not take.
    ValueError
        For an unknown kind or bad generator parameters (nothing is written).
    """
    # Imported here: the defaults above are read by the command's help, which should not
    # wait for the writers' dependencies.
    from voxflow.tasks import write_em_stack, write_lightsheet

    writers = {"lightsheet": write_lightsheet, "em-stack": write_em_stack}
    if kind not in writers:
        raise ValueError(f"`kind` must be one of {tuple(writers)}, got {kind!r}")
    return writers[kind](
        output, shape=shape, seed=seed, overwrite=overwrite, ngff_version=ngff_version, **options
    )
