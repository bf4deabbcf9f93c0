"""LiveViewer: the scene in the browser while it trains, refreshed at an interval.

Rank 0 serves the page of :class:`~lightning_grendel.splatting.viewer.scene_server.SceneServer`. At
each refresh every rank takes part in ``gathered_gaussians`` (under GrendelStrategy an all-gather of
the shards), so whether a step refreshes must be the same decision on every rank: a step count is;
rank 0's state (its clock for ``every_seconds``, whether a page is open, whether the last refresh is
still being sent) is broadcast from rank 0. Rank 0 converts and sends the gathered copy on a worker
thread while training goes on, one refresh at a time (a due refresh is skipped while one is in flight).
Nothing the viewer does may stop training: a server that does not start, a taken port, a closed or slow
browser are warnings, and the page simply stops updating.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

MIN_SECONDS = 10.0  # a page watched by a person needs no more; fast (GPU) steps would refresh far more often
ENV_SWITCH = "LIGHTNING_GRENDEL_LIVE_VIEWER"  # "off" disables every LiveViewer (the test suite, batch jobs)


def _metric(trainer: Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


class LiveViewer(Callback):
    """Serve the training scene as a web page on rank 0, refreshed every ``every_n_steps`` optimizer steps
    (or every ``every_seconds``), showing the step, training loss, last validation PSNR and Gaussian count.

    ``enabled=False`` or the environment variable ``LIGHTNING_GRENDEL_LIVE_VIEWER=off`` (the tests set it)
    makes it a no-op: no server, no gather. The gaussian recipes list it last, so that
    ``--trainer.callbacks.enabled false`` on the command line reaches it.

    Args:
        port: TCP port of the page; when it is taken, a free one is used and the warning gives its URL.
        host: address to listen on; the default 127.0.0.1 keeps the page on this machine (use an SSH
            tunnel from elsewhere), 0.0.0.0 exposes it to the network.
        every_n_steps: refresh the splats every this many optimizer steps.
        every_seconds: refresh instead when this many seconds passed since the last refresh (rank 0's
            clock; under a multi-process strategy that costs one tiny broadcast per step).
        min_seconds: with ``every_n_steps``, skip a due refresh until this many seconds have passed since the
            last one (rank 0's clock), so that fast steps do not make refreshes, and their cost, frequent.
        only_when_watched: skip the refresh (and its gather) while no page is open.
        max_splats: send the page at most this many Gaussians, the ones that weigh most in a picture
            (opacity x size), unless its "Show every Gaussian" box is ticked; None sends every one. What a
            page costs (its drawing and sorting, and each refresh it receives) grows with the count.
        cameras: draw the training cameras as frustums.
        enabled: False turns the live view off (a recipe that lists it, run where nobody watches).
    """

    def __init__(self, port: int = 8080, host: str = "127.0.0.1", every_n_steps: int = 100,
                 every_seconds: float | None = None, min_seconds: float = MIN_SECONDS, only_when_watched: bool = True,
                 cameras: bool = True, max_splats: int | None = 100_000, enabled: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"LiveViewer: every_n_steps must be >= 1, got {every_n_steps}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"LiveViewer: every_seconds must be positive, got {every_seconds}")
        if min_seconds < 0:
            raise ValueError(f"LiveViewer: min_seconds must be >= 0, got {min_seconds}")
        if not 0 <= port <= 65535:
            raise ValueError(f"LiveViewer: port must be in 0..65535, got {port}")
        if max_splats is not None and max_splats < 1:
            raise ValueError(f"LiveViewer: max_splats must be >= 1 or None, got {max_splats}")
        self.port, self.host = port, host
        self.every_n_steps, self.every_seconds, self.min_seconds = every_n_steps, every_seconds, min_seconds
        self.only_when_watched, self.cameras, self.enabled = only_when_watched, cameras, enabled
        self.max_splats = max_splats
        self.server: Any = None  # SceneServer on rank 0 while serving
        self._worker: ThreadPoolExecutor | None = None  # rank 0: converts and sends off the training thread
        self._pending: Future | None = None
        self._active = False  # identical on every rank
        self._last_step = -1
        self._last_time = 0.0
        self._psnr: tuple[float, int] | None = None
        self._failures: set[str] = set()
        self.refreshes = 0

    # --- set-up --------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "gathered_gaussians", None)):
            raise TypeError(f"LiveViewer shows a Gaussian module (one with gathered_gaussians()), got "
                            f"{type(pl_module).__name__}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        switched_off = not self.enabled or os.environ.get(ENV_SWITCH, "").lower() in ("0", "off", "false", "no")
        serving = False
        if trainer.is_global_zero and not switched_off:
            serving = self._start(trainer, pl_module)
        self._active = bool(trainer.strategy.broadcast(serving, src=0))
        if self._active:
            self._refresh(trainer, pl_module)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        from lightning_grendel.splatting.viewer.scene_server import PortInUseError, SceneServer, ViewerError

        options = {"title": "lightning-grendel fit", "max_splats": self.max_splats}
        try:
            try:
                self.server = SceneServer(self.host, self.port, **options)
            except PortInUseError:
                self.server = SceneServer(self.host, 0, **options)
                log.warning("LiveViewer: port %d is taken; serving on %s instead", self.port, self.server.url)
            background = getattr(pl_module, "background", None)
            if background is not None:
                self.server.set_background(background.detach().cpu())
            datamodule = getattr(trainer, "datamodule", None)
            if self.cameras and callable(getattr(datamodule, "train_cameras", None)):
                self.server.set_cameras(datamodule.train_cameras())
        except (ViewerError, OSError, RuntimeError, ValueError) as error:
            log.warning("LiveViewer: not serving the live view: %s", error)
            self._stop_server()
            return False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-viewer")
        print(f"LiveViewer: watch training at {self.server.url}", flush=True)
        return True

    # --- refreshes -----------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self._active or trainer.global_step == self._last_step:
            return
        if self.every_seconds is None:
            if trainer.global_step % self.every_n_steps:
                return  # the same on every rank: no collective needed to agree
            due = time.monotonic() - self._last_time >= self.min_seconds  # rank 0's clock decides
        else:
            due = trainer.is_global_zero and time.monotonic() - self._last_time >= self.every_seconds
        if trainer.is_global_zero:
            due = due and not self._sending() and (not self.only_when_watched or self._watched())
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due, src=0))
        if due:
            self._refresh(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        psnr = _metric(trainer, "val/psnr")
        if psnr is not None and not trainer.sanity_checking:
            self._psnr = (psnr, trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active and trainer.global_step != self._last_step:
            self._refresh(trainer, pl_module)  # the page ends on the trained scene

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._stop_server()
            self._active = False

    def _sending(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def _watched(self) -> bool:
        try:
            return self.server.client_count() > 0
        except Exception as error:  # noqa: BLE001 - the viewer never stops training
            self._warn_once("client count", error)
            return False

    def _refresh(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather every Gaussian (a collective: every rank calls this at the same step); rank 0 hands the copy
        to its worker thread."""
        params = pl_module.gathered_gaussians()
        self._last_step, self._last_time = trainer.global_step, time.monotonic()
        if not trainer.is_global_zero or self._worker is None or params is None:
            return
        own = getattr(pl_module, "gaussians", {})  # on one CPU process the "gather" is the parameters themselves:
        params = {key: value.clone() if key in own and value.data_ptr() == own[key].data_ptr() else value
                  for key, value in params.items()}  # copy them, or the next steps would edit them mid-send
        self._pending = self._worker.submit(self._show, params, trainer.global_step,
                                            _metric(trainer, "train/loss"), self._psnr)

    def _show(self, params: dict[str, Any], step: int, loss: float | None, psnr: tuple[float, int] | None) -> None:
        try:
            self.server.set_gaussians(params)
            self.server.set_status(self.status_text(step, loss, psnr, len(params["means"])))
            self.refreshes += 1
        except Exception as error:  # noqa: BLE001 - the viewer never stops training
            self._warn_once("refresh", error)

    @staticmethod
    def status_text(step: int, loss: float | None, psnr: tuple[float, int] | None, gaussians: int) -> str:
        """The page's status line (Markdown)."""
        parts = [f"**step** {step:,}", f"**loss** {loss:.4f}" if loss is not None else "**loss** –"]
        parts.append(f"**PSNR** {psnr[0]:.2f} dB (val, step {psnr[1]:,})" if psnr else "**PSNR** – (no validation yet)")
        parts.append(f"**Gaussians** {gaussians:,}")
        return "  \n".join(parts)

    def _warn_once(self, what: str, error: Exception) -> None:
        if what not in self._failures:
            self._failures.add(what)
            log.warning("LiveViewer: %s failed (%s: %s); training goes on", what, type(error).__name__, error)

    def _stop_server(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # lets a refresh in flight finish first
            self._worker, self._pending = None, None
        if self.server is not None:
            try:
                self.server.stop()
            except Exception as error:  # noqa: BLE001 - the viewer never stops training
                self._warn_once("stop", error)
            self.server = None
