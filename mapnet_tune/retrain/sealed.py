"""The test split as retrain-best holds it: sealed until registration has returned.

Every decision (candidates, folds, threshold, the champion gate) is made on validation data.
The guard makes that a property of the code rather than of its review: reading the test
images, masks, FOV, extras or patches before :meth:`SealedSplit.release` raises.
"""

from __future__ import annotations

from mapnet_tune.data import Split

#: What a selection step must not read.
_SEALED = ("images", "masks", "fov", "extras", "patches")


class EarlyTestReadError(RuntimeError):
    """The test split was read before registration returned."""


class SealedSplit:
    """A test split whose contents cannot be read until it is released.

    Its names stay readable (they carry no labels); everything else raises
    :class:`EarlyTestReadError` until :meth:`release`.
    """

    def __init__(self, split: Split) -> None:
        self._split = split
        self._released = False

    @property
    def names(self) -> tuple[str, ...]:
        """The test images' names."""
        return self._split.names

    def release(self) -> Split:
        """Open the split: called once the registration (and the gate) has returned."""
        self._released = True
        return self._split

    def __getattr__(self, name: str) -> object:
        if name in _SEALED and not self._released:
            raise EarlyTestReadError(
                f"the test split's {name} were read before registration returned; test may be "
                "scored only after every decision"
            )
        return getattr(self._split, name)
