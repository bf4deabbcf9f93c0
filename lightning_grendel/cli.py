"""The ``lightning-grendel`` command: ``fit | validate | test | predict`` (LightningCLI over every module
and data module of the package, :mod:`lightning_grendel._lightning_cli`), ``render``, ``view``, ``export``
and ``recipes``.

``lightning-grendel --help`` lists the commands (without importing Lightning); ``recipes`` lists the
shipped recipes, ``render`` renders a trained Gaussian scene (see ``render --help``); ``-c NAME``
accepts a listed name as well as a path, so a wheel install runs them without a clone. A mistake in
the input (a missing dataset, a misspelt recipe or flag) ends the command with one line,
``error: <message>``, and exit status 2; ``--traceback`` (or ``LG_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import difflib
import sys

from lightning_grendel._recipes import format_recipe_list
from lightning_grendel._user_errors import report, user_error, wants_traceback

PROG = "lightning-grendel"
TRAINER_COMMANDS = {
    "fit": "train a model: a recipe (-c NAME or a YAML path) plus --trainer.*, --model.*, --data.* flags",
    "validate": "run the validation set once (--ckpt_path: of a saved checkpoint)",
    "test": "evaluate on the test set (--ckpt_path: a checkpoint that fit wrote)",
    "predict": "run the model's predict_step over its predict set",
}
COMMANDS = {
    **TRAINER_COMMANDS,
    "render": "render a trained Gaussian scene (--ckpt or --ply): test views with PSNR/SSIM, an orbit video",
    "view": "serve a trained scene (checkpoint, Grendel directory or PLY/SPZ) as a web page with its cameras",
    "export": "write a trained scene (checkpoint, Grendel directory or PLY) as PLY, SPZ, .splat or compressed PLY",
    "recipes": "list the shipped recipes by name, with what each trains",
}
ALIASES = {"train": "fit", "evaluate": "test", "eval": "test", "list": "recipes"}


class UnknownCommandError(ValueError):
    """The first argument is not a command; the message suggests the closest one."""


def overview() -> str:
    """What ``lightning-grendel --help`` prints: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join([
        f"usage: {PROG} COMMAND [options]      ({PROG} COMMAND --help: the options of one command)", "",
        "PyTorch Lightning for Grendel 3D Gaussian Splatting, cross-mesh pipelines and Lorentz networks.", "",
        "commands:", *lines, "",
        f"example: {PROG} fit -c gaussian/demo      (every recipe: {PROG} recipes)",
        "errors in the input print one line; --traceback (or LG_DEBUG=1) prints the traceback instead",
    ])


def closest_command(word: str) -> str | None:
    """The command ``word`` was probably meant to be (``trian`` -> ``fit``), or ``None``."""
    match = difflib.get_close_matches(word, [*COMMANDS, *ALIASES], n=1, cutoff=0.6)
    return ALIASES.get(match[0], match[0]) if match else None


def _dispatch(argv: list[str]) -> None:
    command = argv[0] if argv else None
    if command in ("-h", "--help"):
        print(overview())
    elif command is None:
        sys.stderr.write(overview() + "\n")
        raise SystemExit(2)
    elif command == "recipes":
        print(format_recipe_list())
    elif command == "render":  # imported here: the render command pulls in OpenCV and the splatting stack
        from lightning_grendel.splatting.viewer.render_command import main as render_main

        render_main(argv[1:])
    elif command == "export":
        from lightning_grendel.splatting.viewer.export_command import main as export_main

        export_main(argv[1:])
    elif command == "view":
        from lightning_grendel.splatting.viewer.view_command import main as view_main

        view_main(argv[1:])
    elif command.startswith("-") or command in COMMANDS:
        from lightning_grendel._lightning_cli import cli  # Lightning is imported only for these
        from lightning_grendel._process_group import leave_process_group

        cli(argv)
        leave_process_group()  # every rank runs this command: they leave gloo together rather than at exit
    else:
        guess = closest_command(command)
        raise UnknownCommandError(f"unknown command {command!r}; {f'did you mean {guess!r}? ' if guess else ''}"
                                  f"`{PROG} --help` lists the commands: {', '.join(COMMANDS)}")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: one line for a mistake in the input (exit 2), a traceback for the rest."""
    argv = list(sys.argv[1:] if args is None else args)
    show_traceback = wants_traceback(argv)
    try:
        _dispatch([arg for arg in argv if arg != "--traceback"])
    except Exception as error:
        found = None if show_traceback else user_error(error)
        if found is None:
            raise
        report(found, argv[0] if argv else PROG)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
