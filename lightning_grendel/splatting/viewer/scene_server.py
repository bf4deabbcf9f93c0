"""The browser viewer's server: a web page (viser's) with the Gaussians, the training cameras as
frustums, a status line and a camera the user flies; shared by ``lightning-grendel view`` and the
live view during ``fit``.

viser sorts and draws the splats in the browser (WebGL); this module only feeds it arrays from
:mod:`~lightning_grendel.splatting.viewer.web_scene`. viser silently moves to the next port when
the one asked for is taken; here the port is checked first, so a taken port is one clear error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.viewer.web_scene import (
    WebCamera,
    overview_camera,
    scene_up,
    web_cameras,
    web_gaussians,
)

SPLATS = "/gaussians"
FRUSTUMS = "/training_cameras"


def _not_a_failed_preconnect(record: logging.LogRecord) -> bool:
    """Browsers open spare connections and close them unused; websockets logs each as a failed handshake."""
    return record.getMessage() != "opening handshake failed"


class ViewerError(ValueError):
    """The viewer cannot start (viser missing, host or port unusable); the message names the flag."""


class PortInUseError(ViewerError):
    """The requested port is taken by another program."""


def check_port(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` when ``host:port`` has a listener, :class:`ViewerError` when the host
    cannot be bound at all. Binds the way the server will (``SO_REUSEADDR``), so only a live listener counts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ViewerError(f"--host {host}: not an address of this machine ({error})") from error
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(f"--port {port}: already in use on {host} (another viewer or program); "
                                     "pick another with --port, or --port 0 for any free one") from error
            raise ViewerError(f"--host {host} --port {port}: cannot listen there: {error.strerror}") from error


def camera_url(base: str, camera: WebCamera, look_distance: float = 1.0) -> str:
    """``base`` with the query that opens the page looking through ``camera`` (viser's ``initialCamera*``
    parameters: position, look-at point, up vector, vertical field of view)."""
    vector = ",".join
    query = {
        "initialCameraPosition": vector(repr(float(v)) for v in camera.position),
        "initialCameraLookAt": vector(repr(float(v)) for v in camera.position + look_distance * camera.forward),
        "initialCameraUp": vector(repr(float(v)) for v in camera.up),
        "initialCameraFov": repr(float(camera.fov)),
    }
    return f"{base}?{urllib.parse.urlencode(query)}"


class SceneServer:
    """A viser server on ``host:port`` showing one Gaussian scene (replaced by :meth:`set_gaussians`).

    Args:
        host: address to listen on (127.0.0.1: this machine only).
        port: TCP port; 0 picks a free one.
        title: label of the control panel.
        max_splats: send at most this many Gaussians (the most salient, ``web_scene.salient``) unless the
            page's "Show every Gaussian" box is ticked; None sends them all.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, title: str = "lightning-grendel",
                 max_splats: int | None = None) -> None:
        if max_splats is not None and max_splats < 1:
            raise ViewerError(f"max_splats must be >= 1 or None, got {max_splats}")
        try:
            import viser
        except ImportError as error:
            raise ViewerError("the viewer needs the viser package: pip install viser") from error
        if port != 0:
            check_port(host, port)
        handshakes = logging.getLogger("websockets.server")
        if _not_a_failed_preconnect not in handshakes.filters:
            handshakes.addFilter(_not_a_failed_preconnect)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # viser's banner; callers print the URL once
                self._server = viser.ViserServer(host=host, port=port, label=title, verbose=False)
        except OSError as error:
            raise ViewerError(f"--host {host} --port {port}: cannot start the viewer: {error}") from error
        self.host, self.port = host, self._server.get_port()
        if port != 0 and self.port != port:  # taken between the check and the bind: viser moved on
            self._server.stop()
            raise PortInUseError(f"--port {port}: already in use on {host}; pick another with --port")
        # No sharing: it opens a tunnel through viser's public relay, which a page must never trigger.
        self._server.request_share_url = lambda *args, **kwargs: None
        self._server.gui.configure_theme(show_share_button=False, show_logo=False)
        self._status = self._server.gui.add_markdown("")
        self._cameras: list[WebCamera] = []
        self._look_distance = 1.0
        self.splats: Any = None  # viser's handle of the splats shown (its buffer is what the page draws)
        self.max_splats = max_splats
        self._sending = threading.Lock()  # a refresh (worker thread) and the box (viser's threads) both send
        self._latest: dict[str, Tensor] | None = None  # kept while capped, to re-send in full on demand
        self._show_all: Any = None
        self._shown: Any = None
        if max_splats is not None:
            self._shown = self._server.gui.add_markdown("")
            self._show_all = self._server.gui.add_checkbox(
                "Show every Gaussian", initial_value=False,
                hint=f"Beyond {max_splats:,} Gaussians the page gets the {max_splats:,} that weigh most "
                     "(opacity x size); tick to get all of them (slower for this page and for training)")

            @self._show_all.on_update
            def _(_: Any) -> None:
                if self._latest is not None:
                    self.set_gaussians(self._latest)

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{shown}:{self.port}/"

    def client_count(self) -> int:
        return len(self._server.get_clients())

    def set_status(self, text: str) -> None:
        """Markdown shown at the top of the control panel (step, loss, PSNR, Gaussians)."""
        self._status.content = text

    def set_background(self, rgb: Any) -> None:
        """Canvas background colour (the render background, RGB in [0, 1])."""
        colour = np.clip(np.round(np.asarray(rgb, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
        self._server.scene.set_background_image(np.broadcast_to(colour, (1, 1, 3)).copy(), format="png")

    def set_gaussians(self, params: dict[str, Tensor]) -> int:
        """Show these Gaussians (replacing the previous ones), at most ``max_splats`` of them unless the
        page asks for all; returns how many the page got."""
        with self._sending:
            capped = self._show_all is not None and not self._show_all.value
            self._latest = params if self._show_all is not None else None
            arrays = web_gaussians(params, self.max_splats if capped else None)
            first = self.splats is None
            self.splats = self._server.scene.add_gaussian_splats(
                SPLATS, centers=arrays.centers, covariances=arrays.covariances, rgbs=arrays.rgbs,
                opacities=arrays.opacities, scale=arrays.scale)
            if not self._cameras and first:
                self._look_distance = self._place_overview(arrays.centers * arrays.scale)
            total = len(params["means"])
            if self._shown is not None:
                self._shown.content = (f"*The page shows the {len(arrays.centers):,} of {total:,} Gaussians that "
                                       "weigh most.*" if len(arrays.centers) < total else "")
            return len(arrays.centers)

    def _place_overview(self, centers: np.ndarray) -> float:
        position, look_at = overview_camera(centers)
        self._server.initial_camera.position = tuple(position)
        self._server.initial_camera.look_at = tuple(look_at)
        return float(np.linalg.norm(position - look_at))

    def set_cameras(self, cameras: Cameras) -> None:
        """Draw the training cameras as frustums, orient the orbit controls by their mean up vector, start
        new pages in the first one, and add a control to jump to any of them."""
        self._cameras = web_cameras(cameras)
        if not self._cameras:
            return
        centres = np.stack([camera.position for camera in self._cameras])
        spread = float(np.median(np.linalg.norm(centres - centres.mean(axis=0), axis=1))) or 1.0
        self._look_distance = spread
        scene = self._server.scene
        scene.set_up_direction(tuple(scene_up(self._cameras)))
        for index, camera in enumerate(self._cameras):
            scene.add_camera_frustum(f"{FRUSTUMS}/{index:05d}", fov=camera.fov, aspect=camera.aspect,
                                     scale=0.08 * spread, thickness=0.004 * spread, color=(230, 80, 40),
                                     wxyz=tuple(camera.wxyz), position=tuple(camera.position))
        first = self._cameras[0]
        initial = self._server.initial_camera
        initial.position = tuple(first.position)
        initial.look_at = tuple(first.position + spread * first.forward)
        initial.up = tuple(first.up)
        initial.fov = first.fov
        self._add_camera_controls()

    def _add_camera_controls(self) -> None:
        gui = self._server.gui
        with gui.add_folder("Training cameras"):
            shown = gui.add_checkbox("Show frustums", initial_value=True)
            index = gui.add_slider("Camera", min=0, max=len(self._cameras) - 1, step=1, initial_value=0)
            go = gui.add_button("View through it")

        @shown.on_update
        def _(_: Any) -> None:
            frustums = self._server.scene.get_handle_by_name(FRUSTUMS)
            if frustums is not None:
                frustums.visible = shown.value

        @go.on_click
        def _(event: Any) -> None:
            if event.client is None:
                return
            camera = self._cameras[int(index.value)]
            handle = event.client.camera
            handle.up_direction = tuple(camera.up)
            handle.position = tuple(camera.position)
            handle.look_at = tuple(camera.position + self._look_distance * camera.forward)
            handle.fov = camera.fov

    def camera_url(self, camera: WebCamera) -> str:
        """This server's URL opening in ``camera``."""
        return camera_url(self.url, camera, self._look_distance)

    def stop(self) -> None:
        self._server.stop()
