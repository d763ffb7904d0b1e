"""Lightning adapters for :class:`deconvis.training.snapshots.SnapshotCallback` and ZF's filter
renormalisation (:class:`FilterRenormLightningCallback`, :mod:`deconvis.training.renorm`) (optional
dependency).

``lightning`` is imported only when :class:`SnapshotLightningCallback` is first looked up (module
``__getattr__``), so ``import deconvis`` never needs it::

    from deconvis.training.lightning import SnapshotLightningCallback
    snap = SnapshotCallback(net, probe, layers=["conv1", "conv2"], out_dir="evo")
    trainer = lightning.pytorch.Trainer(callbacks=[SnapshotLightningCallback(snap, model_attr="net")])

The adapter maps ``on_train_epoch_end`` to ``snap.on_epoch_end(trainer.current_epoch + 1, net)``
and ``on_train_batch_end`` to ``snap.on_step_end(trainer.global_step, net)``, on global rank 0
only (the other ranks train on). ``net`` is ``getattr(pl_module, model_attr)`` when the CNN sits
inside the LightningModule, else the LightningModule itself.
"""
from __future__ import annotations

from typing import Any, Optional

from deconvis.errors import DeconvisError
from deconvis.training.renorm import FilterRenorm
from deconvis.training.snapshots import SnapshotCallback

__all__ = ["SnapshotLightningCallback", "FilterRenormLightningCallback", "lightning_callback_base"]

_CLASS: Optional[type] = None
_RENORM_CLASS: Optional[type] = None


def lightning_callback_base() -> type:
    """``lightning.pytorch.Callback`` (or ``pytorch_lightning.Callback``); DeconvisError if
    neither package is installed."""
    try:
        from lightning.pytorch import Callback  # type: ignore[import-not-found]; optional dependency: lightning
    except ImportError:
        try:
            from pytorch_lightning import Callback  # type: ignore[import-not-found,no-redef]; optional dependency: lightning
        except ImportError:
            raise DeconvisError("the Lightning adapter needs Lightning: pip install lightning "
                                "(or call SnapshotCallback.on_epoch_end from your own loop)") from None
    return Callback


def _build_class() -> type:
    base = lightning_callback_base()

    class SnapshotLightningCallback(base):  # type: ignore[misc, valid-type]
        """Runs a :class:`~deconvis.training.snapshots.SnapshotCallback` from a Lightning ``Trainer``.

        Args:
            snapshots: the configured SnapshotCallback (built with the network, so a bad
                configuration fails before ``trainer.fit``).
            model_attr: attribute of the LightningModule holding the CNN (``None``: the module).
        """

        def __init__(self, snapshots: Any, model_attr: Optional[str] = None) -> None:
            super().__init__()

            if not isinstance(snapshots, SnapshotCallback):
                raise DeconvisError(f"SnapshotLightningCallback needs a SnapshotCallback, got "
                                    f"{type(snapshots).__name__}")
            self.snapshots = snapshots
            self.model_attr = model_attr

        def _net(self, pl_module: Any) -> Any:
            if self.model_attr is None:
                return pl_module
            net = getattr(pl_module, self.model_attr, None)
            if net is None:
                raise DeconvisError(f"{type(pl_module).__name__} has no attribute {self.model_attr!r} "
                                    "(model_attr of SnapshotLightningCallback)")
            return net

        @staticmethod
        def _is_rank_zero(trainer: Any) -> bool:
            zero = getattr(trainer, "is_global_zero", None)
            if zero is not None:
                return bool(zero)
            return int(getattr(trainer, "global_rank", 0)) == 0

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if getattr(trainer, "sanity_checking", False) or not self._is_rank_zero(trainer):
                return
            self.snapshots.on_epoch_end(int(trainer.current_epoch) + 1, self._net(pl_module))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            if self.snapshots.every_n_steps is None or not self._is_rank_zero(trainer):
                return
            self.snapshots.on_step_end(int(trainer.global_step), self._net(pl_module))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self._is_rank_zero(trainer):
                self.snapshots.close()

    return SnapshotLightningCallback


def _build_renorm_class() -> type:
    base = lightning_callback_base()

    class FilterRenormLightningCallback(base):  # type: ignore[misc, valid-type]
        """ZF's filter renormalisation (:mod:`deconvis.training.renorm`) after every optimiser
        step of a Lightning ``Trainer`` (``on_train_batch_end``, every rank: the weights must stay
        equal across ranks).

        Args:
            radius: RMS bound of every conv filter (ZF: 0.1).
            every_n_steps: renormalise every N optimiser steps (1: every step).
            model_attr: attribute of the LightningModule holding the CNN (``None``: the module).
        """

        def __init__(self, radius: float = 0.1, every_n_steps: int = 1, model_attr: Optional[str] = None) -> None:
            super().__init__()

            self.renorm = FilterRenorm(radius, every_n_steps)
            self.model_attr = model_attr

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            net = pl_module if self.model_attr is None else getattr(pl_module, self.model_attr, None)
            if net is None:
                raise DeconvisError(f"{type(pl_module).__name__} has no attribute {self.model_attr!r} "
                                    "(model_attr of FilterRenormLightningCallback)")
            self.renorm.on_step_end(int(trainer.global_step), net)

    return FilterRenormLightningCallback


def __getattr__(name: str) -> Any:
    global _CLASS, _RENORM_CLASS
    if name == "SnapshotLightningCallback":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    if name == "FilterRenormLightningCallback":
        if _RENORM_CLASS is None:
            _RENORM_CLASS = _build_renorm_class()
        return _RENORM_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
