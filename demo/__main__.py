"""`python -m demo [--pipeline FOLDER_OR_HUB_ID] [--host 127.0.0.1] [--port 7860]`: the demo page, served locally."""

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument(
        "--pipeline",
        default=None,
        help="pipeline folder or Hub id the page opens on (default: $DEMO_PIPELINE, else outputs/quickstart/best)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    try:
        from .app import serve
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        sys.exit('The demo page needs gradio: pip install -e ".[demo]"')
    serve(args.pipeline, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
