"""``lightning-grendel view``: a trained scene in the browser, with its training cameras, until Ctrl-C.

The source is anything :func:`~lightning_grendel.splatting.viewer.scene_source.load_scene` reads (a
checkpoint file, a GrendelStrategy checkpoint directory, a standard or compressed PLY, SPZ, ``.splat``).
The training cameras come from the checkpoint's data settings, a recipe's ``data:`` section or
``--data.*`` flags, like ``render``'s. The server listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import time

from lightning_grendel.splatting.viewer.render_command import DATA_FLAGS, RenderError, make_datamodule
from lightning_grendel.splatting.viewer.scene_server import SceneServer, ViewerError, check_port
from lightning_grendel.splatting.viewer.scene_source import SceneSourceError, load_scene

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-grendel view",
        description="Serve a trained Gaussian scene as a web page (viser): the splats, the training cameras "
        "as frustums, and a camera you fly with the mouse. Open the printed URL; Ctrl-C stops it. The page draws "
        "each Gaussian's base colour (SH degree 0).",
    )
    parser.add_argument("source", help="checkpoint file, GrendelStrategy checkpoint directory (meta.pt + "
                        "shard_*.pt), or a PLY / compressed PLY / SPZ / .splat file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this "
                        "machine only; 0.0.0.0 exposes the page to the network)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--config", "-c", help="recipe (name or YAML path) whose data: section gives the cameras")
    for name, kind in DATA_FLAGS.items():
        parser.add_argument(f"--data.{name}", dest=f"data_{name}", type=kind, default=None,
                            help=f"GaussianSplattingDataModule {name} (default: from the checkpoint or recipe)")
    parser.add_argument("--cameras", action=argparse.BooleanOptionalAction, default=True,
                        help="draw the training cameras as frustums (when the dataset is known)")
    return parser


def _explicit_data(args: argparse.Namespace) -> bool:
    return args.config is not None or any(getattr(args, f"data_{name}") is not None for name in DATA_FLAGS)


def open_viewer(args: argparse.Namespace) -> SceneServer:
    """Load the scene and its cameras and start serving; the caller stops the returned server."""
    if not 0 <= args.port <= 65535:
        raise ViewerError(f"--port {args.port}: must be in 0..65535")
    if args.port != 0:
        check_port(args.host, args.port)  # before loading anything: a taken port fails at once
    try:
        scene = load_scene(args.source)
    except SceneSourceError as error:
        raise ViewerError(f"source {error}") from error
    datamodule = None
    if args.cameras and (scene.data or _explicit_data(args)):
        try:
            datamodule = make_datamodule(args, {"datamodule_hyper_parameters": scene.data})
        except RenderError as error:
            if _explicit_data(args):
                raise ViewerError(str(error)) from error
            log.warning("no training cameras: the checkpoint's dataset does not load (%s); pass --data.path", error)
    server = SceneServer(args.host, args.port, title=f"lightning-grendel view: {args.source}")
    try:
        if datamodule is not None:
            server.set_background(datamodule.background)
            server.set_cameras(datamodule.train_cameras())
        elif "background" in scene.data:
            server.set_background(scene.data["background"])
        server.set_status(f"**{scene.params['means'].shape[0]:,}** Gaussians ({scene.kind}: `{args.source}`)")
        server.set_gaussians(scene.params)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str]) -> None:
    """``lightning-grendel view ARGS``; a :class:`ViewerError` reaches the command's one-line error report."""
    args = build_parser().parse_args(argv)
    server = open_viewer(args)
    local = args.host in ("127.0.0.1", "localhost", "::1")
    exposed = "" if local else f"; listening on {args.host}: other machines can connect"
    print(f"viewer: {server.url}  (Ctrl-C stops it{exposed})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()

