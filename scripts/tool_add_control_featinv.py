"""Build the initial FeatInv checkpoint from miniSD: ``python scripts/tool_add_control_featinv.py MINISD OUT``."""
from featinv.commands.build_control import main

if __name__ == "__main__":
    raise SystemExit(main())
