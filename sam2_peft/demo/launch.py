"""`sam2-peft demo`: parse the flags, check the address, load the models, serve the page.

    sam2-peft demo --model facebook/sam2.1-hiera-tiny --adapter ct=runs/ct/final --adapter derm=runs/derm/final
    sam2-peft demo --model tiny-random --adapter runs/lora/final --host 0.0.0.0 --port 7861
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import ipaddress
import logging
import socket

from sam2_peft.data.config import DataConfig

logger = logging.getLogger(__name__)

DESCRIPTION = "a local web page: the base model's and an adapter's masks side by side (needs sam2-peft[demo])"
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def main(argv: list[str]) -> None:
    """Run `sam2-peft demo` with the flags in `argv` until interrupted."""
    parser = build_parser()
    parsed = parser.parse_args(argv)
    adapters = parse_adapters(parsed.adapter, parser)
    if importlib.util.find_spec("gradio") is None:
        parser.error("the demo needs Gradio: `pip install 'sam2-peft[demo]'`.")
    problem = port_problem(parsed.host, parsed.port)
    if problem:
        parser.error(problem)
    from sam2_peft.demo.app import build_app
    from sam2_peft.demo.predictor import DemoPredictor

    data = DataConfig(intensity=parsed.intensity, intensity_percentiles=parsed.intensity_percentiles,
                      ct_window=parsed.ct_window)
    predictor = DemoPredictor.load(parsed.model, adapters, data)
    serve(build_app(predictor, nifti_axis=parsed.nifti_axis), parsed.host, parsed.port)


def build_parser() -> argparse.ArgumentParser:
    """The flags of `sam2-peft demo`."""
    parser = argparse.ArgumentParser(prog="sam2-peft demo", description=DESCRIPTION)
    parser.add_argument("--model", required=True, help="base model: Hub id, local folder, official .pt or tiny-random")
    parser.add_argument(
        "--adapter", action="append", required=True, metavar="[NAME=]PATH",
        help="adapter folder or Hub id; repeat with NAME=PATH for several domains (a dropdown on the page)",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the default reaches this machine only, 0.0.0.0 the network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--intensity", default=None,
                        help="override the adapters' intensity: auto, percentile, minmax, range")
    parser.add_argument("--intensity_percentiles", default=None, help="lower,upper percentile (e.g. 0.5,99.5)")
    parser.add_argument("--ct_window", default=None, help="CT window: abdomen, lung, bone or 'level,width'")
    parser.add_argument("--nifti_axis", type=int, default=2, choices=[0, 1, 2], help="NIfTI axis to slice along")
    return parser


def parse_adapters(specs: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """`[NAME=]PATH` specs -> `(name, path)`; one unnamed adapter is called `default`."""
    named = [tuple(spec.split("=", 1)) if "=" in spec else (None, spec) for spec in specs]
    if len(named) > 1 and any(name is None for name, _ in named):
        unnamed = next(path for name, path in named if name is None)
        parser.error(f"--adapter {unnamed}: with several adapters, name each one: --adapter NAME=PATH.")
    return [(name or "default", path) for name, path in named]


def port_problem(host: str, port: int) -> str | None:
    """Why the page cannot listen on `host:port` (taken, not an address of this machine), or None."""
    if not 0 < port < 65536:
        return f"--port {port} is not a port number (1-65535)."
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"--port {port} is already in use on {host}; stop what listens there or pick another --port."
            return f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); check --host and --port."
    return None


def reach_note(host: str, port: int) -> str:
    """The log line that says who can open the page."""
    if _is_loopback(host):
        return f"Demo at http://{host}:{port}/ (--host {host}: only this machine can reach it)."
    return (f"--host {host}: anyone who can reach this machine on port {port} can use the demo "
            "(upload images, run the models); it has no login.")


def serve(app, host: str, port: int, *, block: bool = True):
    """Launch the Gradio `app` on `host:port` (no share link), logging who can reach it."""
    if _is_loopback(host):
        logger.info(reach_note(host, port))
    else:
        logger.warning(reach_note(host, port))
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                      prevent_thread_lock=not block, footer_links=["api"])


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
